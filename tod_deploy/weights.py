"""Where a model's weights come from: a user's checkpoint (upstream layout) or a seeded init.

Checkpoint problems are the most common user mistake, so every failure names the file, the
key and the shapes involved, and says what to do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tod_deploy.checkpoints import read_checkpoint
from tod_deploy.errors import UserError
from tod_deploy.methods.base import MethodSpec

RANDOM_WEIGHTS_NOTICE = (
    "notice: no --checkpoint given, using deterministic random weights (seed {seed}); "
    "detections are meaningless, pass --checkpoint for a trained model"
)


@dataclass
class LoadReport:
    loaded: int
    missing: list[str] = field(default_factory=list)
    training_only_ignored: list[str] = field(default_factory=list)
    training_only_loaded: list[str] = field(default_factory=list)
    ema_ignored: list[str] = field(default_factory=list)  # an EMA hook's averaged copies (mmcv 1.x ema_* buffers)

    def lines(self) -> list[str]:
        out = [f"loaded {self.loaded} tensors"]
        if self.training_only_loaded:
            out.append(
                f"{len(self.training_only_loaded)} of them are training-only and left out of the deploy graph: "
                f"{_sample(self.training_only_loaded)}"
            )
        if self.training_only_ignored:
            out.append(
                f"ignored {len(self.training_only_ignored)} training-only keys: {_sample(self.training_only_ignored)}"
            )
        if self.ema_ignored:
            out.append(f"ignored {len(self.ema_ignored)} EMA copies of the weights: {_sample(self.ema_ignored)}")
        if self.missing:
            out.append(f"missing {len(self.missing)} training-only keys (kept as initialised): {_sample(self.missing)}")
        return out


def _sample(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seeded_init(model: nn.Module, seed: int) -> None:
    """Deterministic random weights in which every parameter matters.

    Why not the plain init: detection heads start with zeroed or constant tensors (box
    deltas, attention weights, frozen BN at identity), which would make parity checks blind to
    whole branches. Each constant tensor gets a small seeded perturbation instead.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            flat = tensor.reshape(-1)
            if bool((flat == flat[0]).all()):
                noise = torch.randn(tensor.shape, generator=gen) * 0.05
                if name.endswith("running_var"):
                    noise = noise.abs()
                tensor.add_(noise.to(tensor.dtype))


def is_ema_copy(key: str) -> bool:
    """mmcv 1.x EMA hooks keep an averaged copy of every parameter as a buffer ``ema_<name with _>``."""
    return key.startswith("ema_") and "." not in key


def load_checkpoint(model: nn.Module, path: Path, spec: MethodSpec) -> LoadReport:
    """Load upstream-named weights into a method's training form.

    Keys the deploy graph needs must all be present with the right shapes; keys of
    training-only parts may be absent (they are reported) or present (loaded, then dropped
    by ``deploy()``). A key of no known part is refused: silently dropping a module that the
    trainer ran at inference would export a different model.
    """
    checkpoint = read_checkpoint(path)
    original = checkpoint.state_dict
    ema = [k for k in original if is_ema_copy(k)]
    original = {k: v for k, v in original.items() if not is_ema_copy(k)}
    upstream_name = {spec.map_checkpoint_key(k): k for k in original}
    source = {spec.map_checkpoint_key(k): v for k, v in original.items()}
    target = model.state_dict()
    training_only = spec.training_only_prefixes
    if spec.check_checkpoint_keys is not None:
        spec.check_checkpoint_keys(set(source), model)
    for key, value in source.items():
        if key in target and target[key].shape != value.shape:
            raise UserError(
                f"checkpoint {path.name} does not match {spec.name}: {upstream_name[key]} has shape "
                f"{tuple(value.shape)}, the model needs {tuple(target[key].shape)}",
                "check --num-classes and the recipe's model settings, or that this is a checkpoint of " + spec.name,
            )
    # Upstream aliases some modules (e.g. one class head repeated per decoder layer): a key is
    # satisfied when any alias of its tensor is in the checkpoint.
    alias_groups: dict[int, list[str]] = {}
    for key, tensor in target.items():
        alias_groups.setdefault(tensor.data_ptr(), []).append(key)
    satisfied = {k for group in alias_groups.values() if any(a in source for a in group) for k in group}
    missing = [k for k in target if k not in satisfied]
    needed_missing = [k for k in missing if not k.startswith(training_only)]
    if needed_missing:
        needed = sum(not k.startswith(training_only) for k in target)
        raise UserError(
            f"checkpoint {path.name} lacks {len(needed_missing)} of the {needed} "
            f"tensors {spec.name} needs at inference (e.g. {_sample(needed_missing)})",
            f"pass a checkpoint of {spec.name} (upstream key names) or check --method",
        )
    unexpected = [upstream_name[k] for k in source if k not in target and not k.startswith(training_only)]
    if unexpected:
        raise UserError(
            f"checkpoint {path.name} has {len(unexpected)} keys of no part of {spec.name} "
            f"(e.g. {_sample(unexpected)}); without them the export would not be the model that was trained",
            f"check --method and the model options (--detector, --backbone), or remove those keys if {spec.name} "
            "never runs them",
        )
    usable = {k: v for k, v in source.items() if k in target}
    model.load_state_dict(usable, strict=False)
    return LoadReport(
        loaded=len(usable),
        missing=[k for k in missing if k.startswith(training_only)],
        training_only_ignored=[upstream_name[k] for k in source if k not in target],
        ema_ignored=ema,
        training_only_loaded=[upstream_name[k] for k in usable if k.startswith(training_only)],
    )
