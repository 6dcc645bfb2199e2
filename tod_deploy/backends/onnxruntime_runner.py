"""onnxruntime (CPU): reading ONNX files, the one session factory, and the runner.

Every onnxruntime session of tod-deploy comes from :func:`new_session`: it registers the ``tod``
custom op (onnxruntime-extensions) when the model has ``tod::BinaryConv2d`` nodes (reading version-1
nodes as version 2), raises the op's failures as user errors, and turns a model onnxruntime refuses
into one clear line.
"""

from __future__ import annotations

import os
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
    see ``session_options``), as when another runtime is timed in turn on the same cores."""
    import onnxruntime as ort

    from tod_deploy.ops.binary_conv_versions import needs_upgrade, upgrade_to_v2
    from tod_deploy.ops.ort_binary_conv import BinaryConvSession, session_options, uses_binary_conv

    ort.set_default_logger_severity(3)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    binary = uses_binary_conv(proto)
    if binary and needs_upgrade(proto):
        whole = proto if isinstance(model, onnx.ModelProto) else onnx.load(str(model))  # with external data
        model = proto = upgrade_to_v2(whole)
    # tod nodes run in onnxruntime-extensions' custom-op hook, which needs its library registered.
    options = session_options() if binary else ort.SessionOptions()
    if not spinning and not binary:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session_type = BinaryConvSession if binary else ort.InferenceSession
    try:
        return session_type(source, options, providers=["CPUExecutionProvider"])
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
    return OnnxRuntimeRunner(source.onnx_model(), options.threads, spinning=options.spinning)
