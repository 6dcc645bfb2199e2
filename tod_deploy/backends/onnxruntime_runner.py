"""onnxruntime (CPU): reading ONNX files, the one session factory, and the runner.

Every onnxruntime session of tod-deploy comes from :func:`new_session`: a model with
``tod::BinaryConv2d`` nodes (version-1 nodes read as version 2) runs as onnxruntime sessions over its
float parts with the compiled kernel between them (``ops.ort_segments``: no copies per node, unlike
onnxruntime-extensions' hook, which ``ops.ort_binary_conv`` keeps for a user's own session); the op's
failures are user errors, and a model onnxruntime refuses is one clear line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tod_deploy.backends.base import ExportSource, RunnerOptions
from tod_deploy.errors import UserError, first_line


def load_onnx(path: Path) -> onnx.ModelProto:
    """Read and check an ONNX file, turning every kind of corruption into one clear line."""
    if not path.is_file():
        raise UserError(f"{path} does not exist", "pass the .onnx file that tod-deploy export wrote")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ValueError, ... for bad files
        reason = first_line(exc, 160)
        raise UserError(f"{path} is not a valid ONNX model ({reason})", "re-export it with tod-deploy export") from exc
    if not model.graph.node:
        raise UserError(f"{path} is not a valid ONNX model (empty graph)", "re-export it with tod-deploy export")
    return model


def new_session(
    model: onnx.ModelProto | Path | str,
    threads: int | None = None,
    optimize: bool = True,
    spinning: bool = True,
) -> Any:
    """A CPU InferenceSession of ``model`` (a proto or a file path); ``threads`` sets intra-op threads
    (default: every core), ``optimize=False`` runs the graph as written (calibration reads its tensors),
    ``spinning=False`` stops idle intra-op threads busy-waiting (for a model with ``tod`` nodes always:
    the kernel's threads run between onnxruntime's), as when another runtime is timed in turn on the
    same cores. A model with ``tod`` nodes gives an ``ops.ort_segments.SegmentedSession``."""
    import onnxruntime as ort

    from tod_deploy.ops.binary_conv_versions import needs_upgrade, upgrade_to_v2
    from tod_deploy.ops.ort_binary_conv import uses_binary_conv
    from tod_deploy.ops.ort_segments import SegmentedSession

    ort.set_default_logger_severity(3)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    binary = uses_binary_conv(proto)
    if binary:
        whole = proto if isinstance(model, onnx.ModelProto) else onnx.load(str(model))  # with external data
        proto = upgrade_to_v2(whole) if needs_upgrade(whole) else whole
    options = ort.SessionOptions()
    if not spinning or binary:  # the kernel's threads run between onnxruntime's: idle ones must not spin
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    if binary:
        return SegmentedSession(proto, options)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        reason = first_line(exc)
        raise UserError(f"onnxruntime cannot load the model ({reason})", "re-export it with tod-deploy") from exc


class OnnxRuntimeRunner:
    backend = "onnxruntime"

    def __init__(
        self, model: onnx.ModelProto, threads: int | None = None, optimize: bool = True, spinning: bool = True
    ) -> None:
        self.session = new_session(model, threads, optimize=optimize, spinning=spinning)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {self.input_name: images})
        return dict(zip(self.output_names, outs, strict=True))


def open_runner(source: ExportSource, options: RunnerOptions) -> OnnxRuntimeRunner:
    from tod_deploy.environment import cpu_flags
    from tod_deploy.quant.int8 import integer_sum_warning

    warning = integer_sum_warning(source.sidecar, cpu_flags)
    if warning:
        options.log(warning)
    return OnnxRuntimeRunner(source.onnx_model(), options.threads, spinning=options.spinning)


def interleaved_calls(
    models: dict[str, onnx.ModelProto], images: np.ndarray, threads: int | None
) -> dict[str, Callable[[], object]]:
    """One call per model running ``images``, for ``bench.timing.time_interleaved``.

    Their sessions do not spin: the idle threads of the session that just ran would busy-wait on the
    cores the next one runs on. Measured on ThumbDet 4x at 256x256 (2 threads, AMD EPYC, FP32 and two INT8
    files in turn, two passes of 80 rounds): FP32 took 60.2-60.8 ms spinning and 43.1-43.4 ms not; one INT8
    file's ratio to FP32 moved from 1.43x to 1.28x between the passes spinning, and by 0.001 not.
    """
    return {
        name: partial(OnnxRuntimeRunner(model, threads, spinning=False).run, images) for name, model in models.items()
    }
