"""The export step end to end: recipe -> PyTorch deploy model -> ONNX -> passes -> verify -> files.

Also ``reverify``: rebuild the PyTorch side from an export's sidecar and check the file again.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from tod_deploy.artifacts import IOSpec, Sidecar, sidecar_path, staged
from tod_deploy.backends.onnxruntime_runner import load_onnx
from tod_deploy.checkpoint_settings import resolve_recipe_with_checkpoint
from tod_deploy.environment import environment, tod_deploy_version
from tod_deploy.errors import UserError
from tod_deploy.export.onnx import INPUT_NAME, export_to_onnx, kept_outputs
from tod_deploy.export.passes import clean_graph, read_metadata
from tod_deploy.export.verify import PARITY_METADATA, parity_metadata, verify_onnx
from tod_deploy.models import build_deploy_model, parameter_count
from tod_deploy.parity.policy import FP32
from tod_deploy.parity.report import ParityReport

Log = Callable[[str], None]


@dataclass
class ExportResult:
    onnx_path: Path
    sidecar_path: Path
    sidecar: Sidecar
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
    sidecar = Sidecar({
        "tod_deploy_version": metadata["tod_deploy_version"],
        "method": method,
        "recipe": recipe.to_dict(),
        "weights": weights.to_dict(),
        "settings": resolved.to_dict(),
        "raw_export": raw,
        "io": IOSpec.of_onnx(model).to_dict(),
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
    })
    sidecar_file = sidecar_path(onnx_path)
    with staged(onnx_path, sidecar_file) as (tmp_onnx, tmp_json):
        tmp_onnx.write_bytes(payload)
        sidecar.save(tmp_json)
    return ExportResult(onnx_path, sidecar_file, sidecar, report)


def rebuild_deploy_model(sidecar: Sidecar, log: Log = print) -> Any:
    """The PyTorch deploy model an export came from (same recipe, same weights)."""
    weights = sidecar.weights
    checkpoint = Path(weights["checkpoint"]) if weights.get("checkpoint") else None
    deploy, _ = build_deploy_model(sidecar.recipe, checkpoint, int(weights.get("seed", 0)), log)
    return deploy


def reverify(
    onnx_path: Path,
    atol: float = FP32.atol,
    rtol: float = FP32.rtol,
    threads: int | None = None,
    log: Log = print,
    backend: str = "onnxruntime",
    precision: str = "fp32",
) -> ParityReport:
    """The file on ``backend`` against the PyTorch model its sidecar rebuilds."""
    model = load_onnx(onnx_path)
    sidecar = Sidecar.load(onnx_path)
    if read_metadata(model).get("method") not in (None, sidecar.method):
        raise UserError(f"{onnx_path.name} and its sidecar name different methods", "re-export the model")
    deploy = rebuild_deploy_model(sidecar, log)
    policy = replace(FP32, atol=atol, rtol=rtol)
    return verify_onnx(
        model, deploy, sidecar.recipe, policy=policy, threads=threads, backend=backend, precision=precision
    )
