"""OpenVINO (CPU): our ONNX files as they are, 1-bit layers on its native BinaryConvolution.

OpenVINO reads the ONNX in memory through its ONNX frontend with our two conversion rules
(``openvino_ops``), compiles it for the CPU with a precision hint and a thread count, and runs it.
It is an optional extra (``pip install 'tod-deploy[openvino]'``): its absence is one line.

Precision (``--precision``): ``fp32`` pins float32 inference; ``bf16`` asks for bfloat16, which
needs a CPU with native BF16 (AVX-512 BF16 or AMX): elsewhere OpenVINO would silently run float32,
so it is refused; ``auto`` is OpenVINO's own CPU default (bfloat16 where the CPU has AMX, float32
elsewhere). A model with 1-bit layers runs float32 under ``auto`` and refuses ``bf16``: OpenVINO
2026.4's CPU plugin cannot compile BinaryConvolution in bfloat16 (on a Xeon with AMX: "Reorder node
... FakeQuantize ... f32_u1_aBcd16b ... could not create reorder primitive: unsupported reorder
case"). The precision the compiled model really runs is reported (``runner.precision``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx

from tod_deploy.backends.base import ExportSource, RunnerOptions
from tod_deploy.backends.openvino_ops import BinaryLayers, conversion_extensions
from tod_deploy.errors import UserError, first_line

PRECISIONS = ("fp32", "bf16", "auto")
INSTALL = "pip install 'tod-deploy[openvino]'"
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def require_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise UserError("OpenVINO is not installed", f"{INSTALL}, or pick another --backend") from exc
    return openvino


def compile_config(precision: str, threads: int, capabilities: list[str], binary: bool = False) -> dict[str, Any]:
    """The CPU plugin's properties for a precision and thread count (a pure decision, checked first);
    ``binary``: the model has 1-bit layers on BinaryConvolution (float32 only, see module docstring)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", f"choose from {', '.join(PRECISIONS)}")
    if precision == "bf16" and "BF16" not in capabilities:
        raise UserError(
            f"this CPU has no native BF16 (OpenVINO lists {', '.join(capabilities)})",
            "use --precision fp32, or auto (OpenVINO's default: float32 on this CPU)",
        )
    if binary and precision == "bf16":
        raise UserError(
            "OpenVINO cannot compile its 1-bit BinaryConvolution in bfloat16",
            "use --precision fp32 or auto (float32 for 1-bit models)",
        )
    if binary:
        precision = "fp32"
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision in _HINTS:
        config["INFERENCE_PRECISION_HINT"] = _HINTS[precision]
    return config


def read_model(core: Any, model: onnx.ModelProto) -> Any:
    """An ``openvino.Model`` of an ONNX proto (read in memory), or one clear line when OpenVINO refuses it."""
    from openvino import Tensor

    try:
        return core.read_model(model.SerializeToString(), Tensor(np.empty(0, np.uint8)))
    except Exception as exc:  # OpenVINO raises RuntimeError/OpConversionFailure texts many lines long
        # its summary line names the ops: "No conversion rule found for ..." or "Conversion is failed for ..."
        summary = [line.strip("- ") for line in str(exc).splitlines() if line.startswith("-- ")]
        reason = summary[-1] if summary else first_line(exc, 200)
        raise UserError(f"OpenVINO cannot read the model ({reason})", "re-export it with tod-deploy") from exc


class OpenVINORunner:
    backend = "openvino"

    def __init__(
        self, model: onnx.ModelProto, threads: int | None = None, precision: str = "auto", *, profile: bool = False
    ) -> None:
        """``profile``: keep OpenVINO's per-node timings (``request.profiling_info``), for benchmarks."""
        ov = require_openvino()
        core = ov.Core()
        self.binary_layers = BinaryLayers()
        for extension in conversion_extensions(self.binary_layers):
            core.add_extension(extension)
        capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        read = read_model(core, model)  # counts the 1-bit layers it converts
        binary = self.binary_layers.native > 0
        config = compile_config(precision, threads or os.cpu_count() or 1, capabilities, binary)
        config["PERF_COUNT"] = profile
        compiled = core.compile_model(read, "CPU", config)
        ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16 or f16
        self.precision = {"f32": "fp32", "f16": "fp16"}.get(ran, ran)
        self.request = compiled.create_infer_request()
        self.output_names = [o.name for o in model.graph.output]  # OpenVINO keeps the ONNX outputs' order
        self.version = ov.__version__

    def describe(self) -> dict[str, Any]:
        """What bench and eval report beside the timings: the precision it really ran, the 1-bit layers' path."""
        return {"precision": self.precision, "openvino": self.version, "binary_layers": self.binary_layers.to_dict()}

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        result = self.request.infer({0: images})
        return {name: np.array(value) for name, value in zip(self.output_names, result.to_tuple(), strict=True)}


def open_runner(source: ExportSource, options: RunnerOptions) -> OpenVINORunner:
    runner = OpenVINORunner(source.onnx_model(), options.threads, options.precision)
    if runner.binary_layers.native or runner.binary_layers.fallbacks:
        options.log(runner.binary_layers.summary())
    return runner
