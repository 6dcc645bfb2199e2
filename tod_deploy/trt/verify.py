"""``verify model.engine --reference model.onnx``: does the engine compute what the ONNX computes?

The reference is onnxruntime on the ONNX file (which ``verify model.onnx`` has already checked
against PyTorch), fed the same seeded images. Dense outputs are compared element by element and
detections by matching, with the same rules and tolerances as the ONNX check (export/verify.py).
FP16 and INT8 engines need looser tolerances than the FP32 defaults: pass --atol/--rtol.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tod_deploy.errors import UserError
from tod_deploy.export.pipeline import read_sidecar, recipe_of
from tod_deploy.export.verify import (
    DetectionAgreement,
    OutputParity,
    VerificationReport,
    agree_detections,
    compare_arrays,
    verification_images,
)
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
from tod_deploy.runtimes import OnnxRuntimeRunner, load_onnx


def verify_engine(
    engine_path: Path,
    reference: Path | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seeds: tuple[int, ...] = (0, 1, 2),
    log: Callable[[str], None] = print,
) -> VerificationReport:
    """TensorRT vs onnxruntime on seeded inputs; ``reference`` defaults to the ONNX the engine was built from."""
    from tod_deploy.trt.runtime import require_tensorrt

    require_tensorrt()  # first, so a machine without it says so before any slow step
    from tod_deploy.trt.builder import read_engine_sidecar
    from tod_deploy.trt.runner import TensorRTRunner

    if not engine_path.is_file():
        raise UserError(f"{engine_path} does not exist", "pass the .engine file that tod-deploy build-engine wrote")
    reference = reference or Path(read_engine_sidecar(engine_path)["plan"]["onnx"])
    recipe = recipe_of(read_sidecar(reference))
    reference_runner = OnnxRuntimeRunner(load_onnx(reference))
    log(f"loading {engine_path.name} ...")
    engine = TensorRTRunner(engine_path)
    names = [n for n in engine.output_names if n in reference_runner.output_names]
    if not names:
        raise UserError(f"{engine_path.name} and {reference.name} share no output names", "pass the right --reference")
    has_contract = all(name in names for name in CONTRACT_OUTPUTS)
    dense = [n for n in names if not has_contract or n not in CONTRACT_OUTPUTS]
    batch = min(2, engine.profile()[2][0]) if recipe.batch == "dynamic" else int(recipe.batch)
    report = VerificationReport(backend="tensorrt", inputs=len(seeds) * batch, reference="onnxruntime")
    worst: dict[str, OutputParity] = {}
    agreement = DetectionAgreement() if has_contract else None
    for seed in seeds:
        images = verification_images(recipe, batch, seed)
        ref, got = reference_runner.run(images), engine.run(images)
        for name in dense:
            _merge(worst, compare_arrays(name, ref[name], np.asarray(got[name]), atol, rtol))
        if agreement is not None:
            agree_detections(ref, got, recipe.score_threshold, agreement)
    engine.release()
    report.outputs = [worst[name] for name in dense]
    report.detections = agreement
    return report


def _merge(worst: dict[str, OutputParity], parity: OutputParity) -> None:
    prev = worst.setdefault(parity.name, parity)
    if prev is not parity:
        prev.max_abs, prev.max_rel = max(prev.max_abs, parity.max_abs), max(prev.max_rel, parity.max_rel)
        prev.failing += parity.failing
        prev.total += parity.total
