"""``verify model.engine --reference model.onnx``: does the engine compute what the ONNX computes?

The reference is onnxruntime on the ONNX file (which ``verify model.onnx`` has already checked
against PyTorch), fed the same seeded images, compared by the shared comparator with the ONNX
file's own plan (its stored selection rule: score threshold, NMS near-ties, pixel tensors).
FP16 and INT8 engines need looser tolerances than the FP32 defaults: pass --atol/--rtol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner, load_onnx
from tod_deploy.errors import UserError
from tod_deploy.export.verify import has_contract, plan_for
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
from tod_deploy.parity.comparator import compare, verification_images
from tod_deploy.parity.policy import FP32
from tod_deploy.parity.report import ParityReport


def verify_engine(
    engine_path: Path,
    reference: Path | None = None,
    atol: float = FP32.atol,
    rtol: float = FP32.rtol,
    seeds: tuple[int, ...] = (0, 1, 2),
    log: Callable[[str], None] = print,
) -> ParityReport:
    """TensorRT vs onnxruntime on seeded inputs; ``reference`` defaults to the ONNX the engine was built from."""
    from tod_deploy.trt.runtime import require_tensorrt

    require_tensorrt()  # first, so a machine without it says so before any slow step
    from tod_deploy.trt.runner import TensorRTRunner

    if not engine_path.is_file():
        raise UserError(f"{engine_path} does not exist", "pass the .engine file that tod-deploy build-engine wrote")
    reference = reference or Path(Sidecar.load(engine_path)["plan"]["onnx"])
    recipe = Sidecar.load(reference).recipe
    model = load_onnx(reference)
    reference_runner = OnnxRuntimeRunner(model)
    log(f"loading {engine_path.name} ...")
    engine = TensorRTRunner(engine_path)
    names = [n for n in engine.output_names if n in reference_runner.output_names]
    if not names:
        raise UserError(f"{engine_path.name} and {reference.name} share no output names", "pass the right --reference")
    dense = [n for n in names if not has_contract(model) or n not in CONTRACT_OUTPUTS]
    plan = plan_for(model, recipe, dense)
    batch = min(2, engine.profile()[2][0]) if recipe.batch == "dynamic" else int(recipe.batch)
    inputs = [verification_images(recipe, batch, seed) for seed in seeds]
    try:
        return compare(reference_runner, engine, inputs, plan, replace(FP32, atol=atol, rtol=rtol))
    finally:
        engine.release()
