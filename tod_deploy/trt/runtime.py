"""The one place that imports TensorRT, so its absence is a clear error and not an ImportError."""

from __future__ import annotations

from types import ModuleType

from tod_deploy.errors import UserError


def require_tensorrt() -> ModuleType:
    try:
        import tensorrt  # noqa: PLC0415 - TensorRT is optional and heavy
    except ImportError as exc:
        raise UserError(
            "TensorRT is not installed (it needs an NVIDIA GPU machine)",
            "install TensorRT 11 there: pip install 'tod-deploy[gpu]', or use --backend onnxruntime here",
        ) from exc
    return tensorrt
