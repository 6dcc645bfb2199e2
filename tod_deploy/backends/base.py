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

    @classmethod
    def in_memory(cls, model: onnx.ModelProto) -> ExportSource:
        """A model that exists only in memory (a file with inner tensors exposed for a parity check)."""
        return cls(Path(f"{model.graph.name or 'model'}.onnx"), {}, _model=model)

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
    precision: str = "auto"  # OpenVINO: its inference precision hint (fp32, bf16, auto)
    # onnxruntime: idle intra-op threads busy-wait; off when timed beside another runtime (they take its cores)
    spinning: bool = True
    log: Callable[[str], None] = print
