"""What every backend shares: the Runner protocol, the export it runs and how (no runtime imported)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx


class Runner(Protocol):
    backend: str
    output_names: list[str]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass
class ExportSource:
    """One export as the backends need it: its ONNX file and sidecar, and a built engine if there is one."""

    onnx_path: Path
    sidecar: dict[str, Any]
    engine_path: Path | None = None
    _model: onnx.ModelProto | None = field(default=None, repr=False)

    def onnx_model(self) -> onnx.ModelProto:
        """The ONNX file, read and checked once however many backends need it."""
        if self._model is None:
            from tod_deploy.backends.onnxruntime_runner import load_onnx

            self._model = load_onnx(self.onnx_path)
        return self._model


@dataclass(frozen=True)
class RunnerOptions:
    threads: int | None = None  # intra-op threads (default: every core)
    batch: int = 1  # TensorRT: the batch an in-memory build's profile must admit
    cuda_graph: bool = False  # TensorRT: replay the engine as one CUDA graph
    log: Callable[[str], None] = print
