"""The sidecar: one typed, torch-free record beside every artifact, and how artifacts are written.

Every step reads and writes the same JSON document (``model.json`` beside ``model.onnx``,
``model.engine.json`` beside an engine): export writes it, quantize copies and extends it,
build-engine keeps the export's part, and bench, eval, verify and the serving targets read it.
``Sidecar`` is that document with typed accessors (recipe, I/O spec, class names, provenance), so a
reader never rebuilds a dict of its own; it stays a read-only mapping of the JSON for the steps
that report it as it is. Nothing here imports torch: a serving machine reads sidecars too.

Artifacts are written atomically (``staged``): a failed or interrupted step leaves no file that
looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tod_deploy.errors import UserError
from tod_deploy.recipes import Recipe

ENGINE_SUFFIX = ".engine"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the file declares it: a symbolic dim is its name (``"batch"``)."""

    name: str
    dtype: str  # NumPy's name: float32, int32, ...
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IOSpec:
        return cls(
            tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        )

    @classmethod
    def of_onnx(cls, model: Any) -> IOSpec:
        """The I/O an ``onnx.ModelProto`` declares (onnx is imported only here, lazily)."""
        import onnx

        def specs(values: Any) -> tuple[TensorSpec, ...]:
            out = []
            for value in values:
                tensor = value.type.tensor_type
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
                out.append(TensorSpec(value.name, dtype, tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)))
            return tuple(out)

        return cls(specs(model.graph.input), specs(model.graph.output))

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


class Sidecar(Mapping[str, Any]):
    """An artifact's sidecar: the JSON as written, read through typed accessors.

    An engine's sidecar holds its build plan, and the export it came from under ``plan.export``
    (method, recipe, weights, I/O); ``export`` returns that part as a Sidecar of its own, and is
    the sidecar itself for an ONNX file, so readers ask for ``sidecar.export.recipe`` either way.
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    # --- reading and writing -------------------------------------------------------------------
    @classmethod
    def load(cls, model_path: Path) -> Sidecar:
        """The sidecar beside ``model_path`` (``.onnx`` or ``.engine``); a clear error when it is missing."""
        engine = model_path.suffix == ENGINE_SUFFIX
        path = sidecar_path(model_path)
        what = "written by build-engine" if engine else "the export's sidecar"
        fix = "rebuild with tod-deploy build-engine" if engine else "re-export with tod-deploy export"
        if not path.is_file():
            raise UserError(
                f"{path.name} ({what}) is missing beside {model_path.name}", f"{fix}, which writes both files"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg})", fix) from exc
        if not isinstance(data, dict):
            raise UserError(f"{path} is not a tod-deploy sidecar (a JSON object)", fix)
        return cls(data)

    def save(self, path: Path) -> None:
        write_json(path, self._data)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._data))

    # --- Mapping: the JSON as written, read-only ----------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Sidecar(method={self.get('method')!r}, keys={list(self._data)})"

    # --- typed accessors ------------------------------------------------------------------------
    @property
    def is_engine(self) -> bool:
        return "plan" in self._data and "engine" in self._data

    @property
    def export(self) -> Sidecar:
        """The export's part: this sidecar for an ONNX file, the build plan's copy for an engine."""
        return Sidecar(self._data["plan"]["export"]) if self.is_engine else self

    @property
    def method(self) -> str:
        return str(self.export["method"])

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_dict(self.export["recipe"])

    @property
    def io(self) -> IOSpec:
        return IOSpec.from_dict(self.export["io"])

    @property
    def class_names(self) -> list[str]:
        """Names for labels 0..num_classes-1: the recipe's (a checkpoint's meta or --classes), else ``class_<i>``."""
        recipe = self.recipe
        names = list(recipe.classes)
        count = int(recipe.model.get("num_classes", len(names)))
        return names + [f"class_{i}" for i in range(len(names), count)]

    @property
    def weights(self) -> dict[str, Any]:
        return dict(self.export.get("weights") or {})

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8: what quantize or build-engine recorded; an export is fp32."""
        quantization = self.get("quantization") or {}
        return str(quantization.get("precision") or self.get("precision") or "fp32").lower()

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the artifact came from: tod-deploy version, weights, source file, environment."""
        keys = ("tod_deploy_version", "weights", "source", "environment")
        return {key: self.export.get(key, self.get(key)) for key in keys}


def sidecar_path(model_path: Path) -> Path:
    """``model.onnx`` -> ``model.json``; ``model.engine`` -> ``model.engine.json`` (the export keeps its own)."""
    if model_path.suffix == ENGINE_SUFFIX:
        return model_path.with_name(model_path.name + ".json")
    return model_path.with_suffix(".json")


@contextlib.contextmanager
def staged(*targets: Path) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``targets``; rename them over the targets only on success.

    Why: an interrupted or failed export must not leave a ``.onnx`` that looks finished.
    """
    temps = []
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        os.close(fd)
        temps.append(Path(tmp))
    try:
        yield temps
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
