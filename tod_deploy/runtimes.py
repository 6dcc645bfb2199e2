"""Runners that execute one model on one backend with the same call: ``run(images) -> dict``.

``verify`` and ``bench`` both go through these so that what is timed is what was checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch

from tod_deploy.errors import UserError, first_line
from tod_deploy.methods.base import DeployModel


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


class TorchRunner:
    backend = "torch"

    def __init__(self, model: DeployModel, output_names: list[str], threads: int | None = None) -> None:
        self.model = model.eval()
        self.output_names = output_names
        if threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        values = self.model.run(torch.from_numpy(images))
        return {name: values[name].numpy() for name in self.output_names}


class OnnxRuntimeRunner:
    backend = "onnxruntime"

    def __init__(self, model: onnx.ModelProto, threads: int | None = None) -> None:
        import onnxruntime as ort

        from tod_deploy.ops.ort_binary_conv import session_options, uses_binary_conv

        ort.set_default_logger_severity(3)
        binary = uses_binary_conv(model)
        # tod nodes run in onnxruntime-extensions' custom-op hook, which needs its library registered.
        options = session_options() if binary else ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            reason = first_line(exc)
            raise UserError(f"onnxruntime cannot load the model ({reason})", "re-export it with tod-deploy") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {self.input_name: images})
        return dict(zip(self.output_names, outs, strict=True))
