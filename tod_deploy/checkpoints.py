"""Read a training checkpoint as its trainer wrote it, without running anything it contains.

Trainers save more than weights: the Deformable-DETR fork behind ThumbDet saves
``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}`` with ``args`` an ``argparse.Namespace``;
mmengine (mmdet 3) saves ``{'meta', 'state_dict', 'optimizer', 'param_schedulers', 'message_hub'}``
whose message hub holds mmengine objects; mmcv 1.x (mmdet 2) saves ``{'meta', 'state_dict',
'optimizer'}`` with the class names and the config text in ``meta``. None of those classes need be
importable here, and none may run: a pickle is a program, and a checkpoint is untrusted input.

So the file is read by torch's weights-only unpickler (tensors, plain containers, a short list of
allowed constructors). Every other global the pickle names is bound to an inert placeholder class
that only stores the state handed to it: an object of a trainer's class becomes a placeholder with
its attributes, readable as data. A global the pickle *calls* (``os.system``, ``eval``, ...) is
refused: the call went to a placeholder, so nothing it asked for ran, and the file is rejected
with the global named.
"""

from __future__ import annotations

import functools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tod_deploy.errors import UserError

RESAVE_FIX = "load it in the training environment and save the weights alone: torch.save(model.state_dict(), path)"
# Where trainers put the model's weights, in the order looked for.
WEIGHT_KEYS = ("state_dict", "model", "model_state_dict")
# Top-level entries holding an exponential-moving-average copy (mmengine EMAHook: 'ema_state_dict').
EMA_ENTRIES = ("ema_state_dict", "ema")
# Data classes a pickle rebuilds by calling them (REDUCE), harmless as placeholders: calling is
# how they are pickled, not code of the trainer's.
CALLED_DATA_CLASSES = frozenset(
    {
        "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
        "pathlib._local.PosixPath", "pathlib._local.WindowsPath", "datetime.datetime", "datetime.date",
        "datetime.time", "datetime.timedelta", "collections.deque", "builtins.slice", "builtins.complex",
    }
)  # fmt: skip


def _numpy_constructors() -> dict[str, Any]:
    """numpy's own array/scalar/dtype rebuilders (mmengine's message hub pickles numpy arrays), under
    the names numpy 1 and numpy 2 pickle them as; protocol-2 bytes come through ``_codecs.encode``."""
    import _codecs

    from numpy._core import multiarray  # numpy 2's home; numpy 1.26 (pinned by the serve extra) forwards it
    found = {"_codecs.encode": _codecs.encode, "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for package in ("numpy.core", "numpy._core"):
        found[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        found[f"{package}.multiarray.scalar"] = multiarray.scalar
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            found[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return found


class Placeholder:
    """An object of a class that is not loaded: its pickled name and state, as data.

    Subclassed once per global name (``global_name``); ``called`` records a REDUCE, i.e. the pickle
    called the global instead of rebuilding an object of it.
    """

    global_name = ""
    called: tuple[Any, ...] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).called = args
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def attributes(self) -> dict[str, Any]:
        """The object's attributes as pickled (``__dict__``, or the dict part of a (dict, slots) state)."""
        state = getattr(self, "state", None)
        if isinstance(state, tuple) and state and isinstance(state[0], dict | type(None)):
            state = {**(state[0] or {}), **(state[1] if len(state) > 1 and isinstance(state[1], dict) else {})}
        return dict(state) if isinstance(state, Mapping) else {}

    def __repr__(self) -> str:
        return f"<{self.global_name} (not loaded)>"


def _placeholder(name: str) -> type[Placeholder]:
    return type(name.rsplit(".", 1)[-1], (Placeholder,), {"global_name": name, "called": None})


@dataclass
class TrainingCheckpoint:
    """A checkpoint's weights and what its trainer wrote beside them, as plain data."""

    path: Path
    layout: str  # which trainer's format: "mmengine", "mmcv", "deformable-detr" or "state dict"
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # meta / args, placeholders turned into dicts
    ignored: list[str] = field(default_factory=list)  # top-level entries not used (optimizer, EMA copy, ...)
    placeholders: list[str] = field(default_factory=list)  # trainer classes read as data

    def class_names(self) -> list[str] | None:
        """The class names the trainer recorded (mmcv ``meta.CLASSES``, mmengine ``meta.dataset_meta.classes``)."""
        names = self.meta.get("CLASSES") or (self.meta.get("dataset_meta") or {}).get("classes")
        if isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names):
            return list(names)
        return None

    def config_text(self) -> str | None:
        """The training config as text (mmcv ``meta.config``, mmengine ``meta.cfg``), if recorded."""
        text = self.meta.get("config") or self.meta.get("cfg")
        return text if isinstance(text, str) and text.strip() else None


def read_checkpoint(path: Path) -> TrainingCheckpoint:
    """The checkpoint at ``path``; every problem is one UserError naming the file and the fix."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist", "pass the path of a .pth file with --checkpoint")
    return _read(path.resolve(), path.stat().st_mtime_ns, path.stat().st_size)


@functools.lru_cache(maxsize=1)
def _read(path: Path, _mtime: int, _size: int) -> TrainingCheckpoint:
    """Cached per file version: export reads the checkpoint's settings, then builds the model from it."""
    placeholders: dict[str, type[Placeholder]] = {}
    obj = _unpickle(path, placeholders)
    called = sorted(name for name, cls in placeholders.items() if cls.called is not None and name not in
                    CALLED_DATA_CLASSES)  # fmt: skip
    if called:
        raise _refused(path, called[0])
    return _unwrap(path, obj, sorted(placeholders))


def _unpickle(path: Path, placeholders: dict[str, type[Placeholder]]) -> Any:
    allowed = _numpy_constructors()
    if zipfile.is_zipfile(path):
        try:
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged archive fails here first
            raise _unreadable(path, exc) from exc
        for name in unknown:
            if name not in allowed:
                placeholders[name] = _placeholder(name)
    safe = [(fn, name) for name, fn in allowed.items()] + [(cls, name) for name, cls in placeholders.items()]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises anything from IndexError to UnpicklingError on bad files
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> UserError:
    """One line for a file torch cannot read; torch's advice to retry with weights_only=False is never passed on."""
    text = str(exc)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:  # torch refuses some modules outright (os, posix, subprocess, builtins' exec/eval, ...)
        return _refused(path, blocked.group(1))
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    reason = (lines or [type(exc).__name__])[0]
    return UserError(
        f"cannot read checkpoint {printable(path.name)}: {printable(reason[:200])}",
        "pass a PyTorch .pth saved with torch.save",
    )


def printable(text: str) -> str:
    """Text from the file as it may be shown on a terminal: control characters (ANSI escapes) escaped."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def _refused(path: Path, global_name: str) -> UserError:
    return UserError(
        f"checkpoint {printable(path.name)} calls {printable(global_name)} while loading, which a checkpoint has no "
        "reason to do; refused (nothing it asked for was run)",
        "use a checkpoint from a source you trust, or " + RESAVE_FIX,
    )


def plain(value: Any) -> Any:
    """Placeholders -> their attribute dicts, containers recursively; tensors and scalars as they are."""
    if isinstance(value, Placeholder):
        return {key: plain(item) for key, item in value.attributes().items()}
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(item) for item in value)
    return value


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrap(path: Path, obj: Any, placeholders: list[str]) -> TrainingCheckpoint:
    if _is_state_dict(obj):
        return TrainingCheckpoint(path, "state dict", _strip_data_parallel(obj), placeholders=placeholders)
    if not isinstance(obj, Mapping):
        raise UserError(
            f"checkpoint {path.name} holds a {type(obj).__name__}, not a state dict or a trainer's checkpoint",
            RESAVE_FIX,
        )
    weights_key = next((key for key in WEIGHT_KEYS if _is_state_dict(obj.get(key))), None)
    if weights_key is None:
        raise UserError(
            f"checkpoint {path.name} holds no state dict (top-level keys: {', '.join(map(str, list(obj)[:8]))})",
            "pass a checkpoint whose 'state_dict' or 'model' maps names to tensors, or " + RESAVE_FIX,
        )
    if "args" in obj and weights_key == "model":
        layout, meta = "deformable-detr", plain(obj["args"])
    elif "message_hub" in obj or "param_schedulers" in obj:
        layout, meta = "mmengine", plain(obj.get("meta") or {})
    elif "meta" in obj:
        layout, meta = "mmcv", plain(obj.get("meta") or {})
    else:
        layout, meta = "state dict", {}
    ignored = [str(key) for key in obj if key != weights_key]
    return TrainingCheckpoint(
        path, layout, _strip_data_parallel(obj[weights_key]), meta if isinstance(meta, dict) else {}, ignored,
        placeholders,
    )  # fmt: skip


def _strip_data_parallel(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel / DistributedDataParallel save every key under ``module.``."""
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def describe_checkpoint(checkpoint: TrainingCheckpoint) -> str:
    """One line: whose format, what was used, what was read as data and what was not used."""
    parts = [f"{checkpoint.layout} format, {len(checkpoint.state_dict)} tensors"]
    if checkpoint.ignored:
        parts.append(f"not used: {', '.join(checkpoint.ignored)}")
    if checkpoint.placeholders:
        parts.append(f"trainer classes read as data, not loaded: {', '.join(checkpoint.placeholders)}")
    return "; ".join(parts)
