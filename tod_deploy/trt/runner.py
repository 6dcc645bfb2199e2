"""Run a TensorRT engine with the same call as the other runners: ``run(images) -> {output: array}``.

Copies in, the engine, and copies out are bracketed by CUDA events, so a run reports transfer and
compute time separately (``last_ms``, ``stage_means``): a GPU's FPS depends on which one is counted.
With ``cuda_graph=True`` the engine's launches are captured once per input shape and replayed,
which removes the CPU's per-launch cost from small-batch latency.

TensorRT API: named I/O tensors, ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``
(https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tod_deploy.errors import UserError
from tod_deploy.trt.runtime import require_cuda, require_tensorrt

STAGES = ("h2d_ms", "compute_ms", "d2h_ms")
DRIVER_FIX_MEMORY = "free GPU memory (nvidia-smi shows who holds it) or build with a smaller --max profile"


class TensorRTRunner:
    backend = "tensorrt"

    def __init__(self, engine: Path | bytes, cuda_graph: bool = False) -> None:
        trt = require_tensorrt()
        self.cuda = require_cuda()
        # No plugin registration: the tod::BinaryConv2d plugin is AOT, so its kernel (PTX, launch
        # parameters, arguments) is inside the engine and deserializing needs no Python code.
        data = engine.read_bytes() if isinstance(engine, Path) else engine
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if self.engine is None:
            raise UserError(
                "TensorRT could not load the engine (built by another TensorRT version or for another GPU?)",
                "rebuild it on this machine with tod-deploy build-engine",
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:  # e.g. not enough GPU memory for the engine's activations
            raise UserError("TensorRT could not create an execution context for the engine", DRIVER_FIX_MEMORY)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {name: self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self.inputs = [name for name in names if is_input[name]]
        self.output_names = [name for name in names if not is_input[name]]
        if len(self.inputs) != 1:
            raise UserError(f"the engine has {len(self.inputs)} inputs", "tod-deploy engines take one input, images")
        self.input_name = self.inputs[0]
        self.dtypes = {name: np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))) for name in names}
        self.cuda_graph = cuda_graph
        self.stream = self.cuda.stream()
        self.events = [self.cuda.event() for _ in range(len(STAGES) + 1)]
        self.device: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        self.shape: tuple[int, ...] | None = None
        self.graph: Any = None
        self.last_ms: dict[str, float] = {}
        self.stage_ms: dict[str, list[float]] = {stage: [] for stage in STAGES}

    def profile(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """min / opt / max input shape of the engine's (single) optimization profile."""
        lo, mid, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        return tuple(lo), tuple(mid), tuple(hi)

    def _bind(self, shape: tuple[int, ...]) -> None:
        """(Re)allocate buffers and bind addresses when the input shape changes."""
        lo, _, hi = self.profile()
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            raise UserError(
                f"input {self.input_name!r} shape {list(shape)} is outside the engine's profile {list(lo)}..{list(hi)}",
                "rebuild with tod-deploy build-engine --min/--opt/--max covering it",
            )
        self.release()
        if not self.context.set_input_shape(self.input_name, shape):  # returns False for a shape it refuses
            raise UserError(f"TensorRT refused input shape {list(shape)}", "rebuild with a profile covering it")
        for name in [self.input_name, *self.output_names]:
            dims = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in dims):
                raise UserError(f"engine output {name!r} has a data-dependent shape {list(dims)}", "re-export it")
            self.host[name] = np.empty(dims, dtype=self.dtypes[name])
            self.device[name] = self.cuda.malloc(self.host[name].nbytes)
            if not self.context.set_tensor_address(name, self.device[name]):
                raise UserError(f"TensorRT refused the device buffer of {name!r}", "rerun with --debug and report it")
        self.shape = shape
        if self.cuda_graph:
            # One plain enqueue first, so TensorRT's deferred shape work is not captured.
            self._enqueue()
            self.cuda.begin_capture(self.stream)
            self._enqueue()
            self.graph = self.cuda.end_capture(self.stream)

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise UserError("TensorRT failed to run the engine (its log above says why)", "rerun with --debug")

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=self.dtypes[self.input_name])
        if images.shape != self.shape:
            self._bind(images.shape)
        cuda, stream, ev = self.cuda, self.stream, self.events
        cuda.record(ev[0], stream)
        cuda.htod(self.device[self.input_name], images, stream)
        cuda.record(ev[1], stream)
        if self.graph is not None:
            cuda.launch_graph(self.graph, stream)
        else:
            self._enqueue()
        cuda.record(ev[2], stream)
        for name in self.output_names:
            cuda.dtoh(self.host[name], self.device[name], stream)
        cuda.record(ev[3], stream)
        cuda.synchronize(stream)
        self.last_ms = {stage: cuda.elapsed_ms(ev[i], ev[i + 1]) for i, stage in enumerate(STAGES)}
        for stage, ms in self.last_ms.items():
            self.stage_ms[stage].append(ms)
        return {name: self.host[name].copy() for name in self.output_names}

    def stage_means(self) -> dict[str, float]:
        """Mean transfer-in, compute and transfer-out time over every run so far (GPU clock)."""
        return {stage: float(np.mean(times)) for stage, times in self.stage_ms.items() if times}

    def release(self) -> None:
        for ptr in self.device.values():
            self.cuda.free(ptr)
        self.device.clear()
        self.graph = None
        self.shape = None


def runner_for(
    engine: Path | None, onnx_path: Path, batch: int, log: Callable[[str], None], cuda_graph: bool = False
) -> TensorRTRunner:
    """A runner for a built engine, or for an engine built in memory from ``onnx_path`` (nothing written).

    The in-memory build keeps the export's defaults and widens a dynamic batch profile to ``batch``.
    """
    if engine is not None:
        return TensorRTRunner(engine, cuda_graph)
    from tod_deploy.trt.builder import build_serialized, plan_build

    plan = plan_build(onnx_path)
    first = plan.profiles[0]
    if first.min[0] != first.max[0]:  # a dynamic batch
        widened = dataclasses.replace(
            first, opt=(batch, *first.opt[1:]), max=(max(batch, first.max[0]), *first.max[1:])
        )
        plan.profiles = [widened, *plan.profiles[1:]]
    return TensorRTRunner(build_serialized(plan, log), cuda_graph)
