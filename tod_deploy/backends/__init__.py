"""Runtimes behind one protocol: a runner runs one model on one runtime, ``run(images) -> {name: array}``.

One module per runtime, each with ``open_runner(source, options)``: ``torch_runner`` (the PyTorch
deploy model rebuilt from the sidecar), ``onnxruntime_runner`` (the one session factory, with the
``tod`` op binding), ``tensorrt_runner`` (a built engine, or one built in memory), ``openvino_runner``
(the ONNX read by OpenVINO, 1-bit layers on its BinaryConvolution). ``open_runner``
here picks the module by name, so bench and eval never chain on backend strings; a new runtime is
one module and its entry in ``MODULES``.
"""

from __future__ import annotations

import importlib

from tod_deploy.backends.base import ExportSource, Runner, RunnerOptions
from tod_deploy.errors import UserError

MODULES = {
    "torch": "torch_runner",
    "onnxruntime": "onnxruntime_runner",
    "tensorrt": "tensorrt_runner",
    "openvino": "openvino_runner",
}
BACKENDS = tuple(MODULES)

__all__ = ["BACKENDS", "ExportSource", "Runner", "RunnerOptions", "open_runner", "parse_backends"]


def parse_backends(text: str | None, default: str) -> list[str]:
    """``"torch,onnxruntime"`` -> known backend names, each once, in the order given."""
    names = [b.strip().lower() for b in (text or default).split(",") if b.strip()]
    unknown = [b for b in names if b not in MODULES]
    if not names or unknown:
        raise UserError(f"unknown backend(s) {unknown or text!r}", f"choose from {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def open_runner(name: str, source: ExportSource, options: RunnerOptions | None = None) -> Runner:
    """The runner of backend ``name`` for an export (the runtime's module is imported only now)."""
    if name not in MODULES:
        raise UserError(f"unknown backend {name!r}", f"choose from {', '.join(BACKENDS)}")
    module = importlib.import_module(f"tod_deploy.backends.{MODULES[name]}")
    return module.open_runner(source, options or RunnerOptions())
