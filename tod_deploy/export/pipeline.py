"""The export step end to end: recipe -> PyTorch deploy model -> ONNX -> passes -> verify -> files.

Also ``reverify``: rebuild the PyTorch side from an export's sidecar and check the file again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from tod_deploy.backends.onnxruntime_runner import load_onnx
from tod_deploy.checkpoint_settings import resolve_recipe_with_checkpoint
from tod_deploy.environment import environment, tod_deploy_version
from tod_deploy.errors import UserError
from tod_deploy.export.artifacts import sidecar_path, staged, write_json
from tod_deploy.export.onnx import INPUT_NAME, export_to_onnx, kept_outputs
from tod_deploy.export.passes import clean_graph, read_metadata
from tod_deploy.export.verify import PARITY_METADATA, parity_metadata, verify_onnx
from tod_deploy.models import build_deploy_model, parameter_count
from tod_deploy.parity.policy import FP32
from tod_deploy.parity.report import ParityReport
from tod_deploy.recipes import Recipe

Log = Callable[[str], None]


@dataclass
class ExportResult:
    onnx_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]
    verification: ParityReport | None


class Steps:
    """Numbered progress lines with timings on stderr-like ``log``: exports take tens of seconds."""

    def __init__(self, total: int, log: Log) -> None:
        self.total, self.log, self.index = total, log, 0

    def run(self, title: str, fn: Callable[[], Any]) -> Any:
        self.index += 1
        start = time.perf_counter()
        self.log(f"[{self.index}/{self.total}] {title} ...")
        value = fn()
        self.log(f"[{self.index}/{self.total}] {title} done in {time.perf_counter() - start:.1f} s")
        return value


def io_spec(model: onnx.ModelProto) -> dict[str, list[dict[str, object]]]:
    def describe(values: Any) -> list[dict[str, object]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def export_model(
    method: str,
    output_dir: Path = Path("artifacts"),
    checkpoint: Path | None = None,
    variant: str | None = None,
    overrides: dict[str, Any] | None = None,
    raw: bool = False,
    seed: int = 0,
    verify: bool = True,
    name: str | None = None,
    extras: tuple[str, ...] = (),
    log: Log = print,
) -> ExportResult:
    resolved = resolve_recipe_with_checkpoint(method, variant, overrides, checkpoint)
    for line in resolved.lines():
        log(line)
    recipe = resolved.recipe
    onnx_path = Path(output_dir) / f"{name or recipe.stem()}.onnx"
    steps = Steps(4 if verify else 3, log)

    deploy, weights = steps.run(
        f"build {method} deploy model", lambda: build_deploy_model(recipe, checkpoint, seed, log)
    )
    unknown = [e for e in extras if e not in deploy.extra_names]
    if unknown:
        offered = ", ".join(deploy.extra_names) or "none"
        raise UserError(f"{method} has no extra output {unknown[0]!r}", f"extra outputs of {method}: {offered}")
    exported = steps.run(
        f"export to ONNX (opset {recipe.opset}, batch {recipe.batch}, {recipe.input_size[0]}x{recipe.input_size[1]})",
        lambda: export_to_onnx(deploy, recipe),
    )
    keep = kept_outputs(deploy, raw, extras)
    metadata = {
        "tod_deploy_version": tod_deploy_version(),
        "method": method,
        "recipe": recipe.to_dict(),
        "raw_tensors": list(deploy.raw_names),
        "parity_tensors": list(deploy.parity_names),
        PARITY_METADATA: parity_metadata(deploy, recipe),
        "input": f"{INPUT_NAME}: float32 [N,3,H,W] RGB 0..255",
    }
    model = steps.run(
        "graph passes (fold constants, clean up, name outputs)", lambda: clean_graph(exported, keep, metadata)
    )
    onnx.checker.check_model(model, full_check=True)
    report = None
    if verify:
        report = steps.run("verify onnxruntime against PyTorch", lambda: verify_onnx(model, deploy, recipe))
        if not report.ok:
            raise UserError(
                f"verification failed, nothing written: {report.failure()}",
                "rerun with --debug, or --no-verify to write the file anyway for inspection",
            )
    payload = model.SerializeToString()
    sidecar = {
        "tod_deploy_version": metadata["tod_deploy_version"],
        "method": method,
        "recipe": recipe.to_dict(),
        "weights": weights.to_dict(),
        "settings": resolved.to_dict(),
        "raw_export": raw,
        "io": io_spec(model),
        "raw_tensors": list(deploy.raw_names),
        "model": {
            "parameters": parameter_count(deploy),
            "submodules": [name for name, _ in deploy.named_children()]
            + [f"{name}.{child}" for name, mod in deploy.named_children() for child, _ in mod.named_children()],
        },
        "onnx": {
            "file": onnx_path.name,
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "opset": recipe.opset,
            "ir_version": model.ir_version,
            "nodes": len(model.graph.node),
            "ops": dict(Counter(node.op_type for node in model.graph.node).most_common()),
        },
        "verification": report.to_dict() if report else None,
        "environment": environment(),
    }
    sidecar_file = sidecar_path(onnx_path)
    with staged(onnx_path, sidecar_file) as (tmp_onnx, tmp_json):
        tmp_onnx.write_bytes(payload)
        write_json(tmp_json, sidecar)
    return ExportResult(onnx_path, sidecar_file, sidecar, report)


def read_sidecar(onnx_path: Path) -> dict[str, Any]:
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise UserError(
            f"{path.name} (the export's sidecar) is missing beside {onnx_path.name}",
            "re-export with tod-deploy export, which writes both files",
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg})", "re-export with tod-deploy export") from exc


def recipe_of(sidecar: dict[str, Any]) -> Recipe:
    return Recipe.from_dict(sidecar["recipe"])


def rebuild_deploy_model(sidecar: dict[str, Any], log: Log = print) -> Any:
    """The PyTorch deploy model an export came from (same recipe, same weights)."""
    weights = sidecar["weights"]
    checkpoint = Path(weights["checkpoint"]) if weights.get("checkpoint") else None
    deploy, _ = build_deploy_model(recipe_of(sidecar), checkpoint, int(weights.get("seed", 0)), log)
    return deploy


def reverify(
    onnx_path: Path, atol: float = FP32.atol, rtol: float = FP32.rtol, threads: int | None = None, log: Log = print
) -> ParityReport:
    model = load_onnx(onnx_path)
    sidecar = read_sidecar(onnx_path)
    if read_metadata(model).get("method") not in (None, sidecar["method"]):
        raise UserError(f"{onnx_path.name} and its sidecar name different methods", "re-export the model")
    deploy = rebuild_deploy_model(sidecar, log)
    return verify_onnx(model, deploy, recipe_of(sidecar), policy=replace(FP32, atol=atol, rtol=rtol), threads=threads)
