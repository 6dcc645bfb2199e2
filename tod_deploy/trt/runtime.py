"""The one place that imports TensorRT and the CUDA bindings, so their absence is a clear error.

``require_cuda`` returns a small device API over whichever bindings are installed: NVIDIA's
cuda-python (``cuda.bindings.runtime``, what the ``gpu`` extra brings) or else pycuda. The runner
needs only allocation, copies, streams, events and graph capture, and this keeps it unaware of which.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from tod_deploy.errors import UserError

DRIVER_FIX = "check the NVIDIA driver with nvidia-smi, or use --backend onnxruntime on machines without a GPU"


def require_tensorrt() -> ModuleType:
    try:
        import tensorrt  # noqa: PLC0415 - TensorRT is optional and heavy
    except ImportError as exc:
        raise UserError(
            "TensorRT is not installed (it needs an NVIDIA GPU machine)",
            "install TensorRT 11 there: pip install 'tod-deploy[gpu]', or use --backend onnxruntime here",
        ) from exc
    return tensorrt


class CudaApi(Protocol):
    """What the TensorRT runner and the plugin need from CUDA.

    Device pointers are ints; streams and events are the bindings' own handles, and ``int(stream)``
    is what TensorRT's ``execute_async_v3`` takes.
    """

    name: str

    def compute_capability(self) -> tuple[int, int]: ...
    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def stream(self) -> Any: ...
    def event(self) -> Any: ...
    def record(self, event: Any, stream: Any) -> None: ...
    def elapsed_ms(self, start: Any, end: Any) -> float: ...
    def synchronize(self, stream: Any) -> None: ...
    def htod(self, ptr: int, array: np.ndarray, stream: Any) -> None: ...
    def dtoh(self, array: np.ndarray, ptr: int, stream: Any) -> None: ...
    def begin_capture(self, stream: Any) -> None: ...
    def end_capture(self, stream: Any) -> Any: ...
    def launch_graph(self, graph: Any, stream: Any) -> None: ...


@functools.cache
def require_cuda() -> CudaApi:
    """The installed CUDA bindings, checked against a usable device (one line if there is none)."""
    try:
        from cuda.bindings import runtime  # noqa: PLC0415
    except ImportError:
        try:
            import pycuda.driver  # noqa: F401, PLC0415
        except ImportError as exc:
            raise UserError(
                "no CUDA Python bindings are installed (cuda-python or pycuda)",
                "pip install 'tod-deploy[gpu]' (brings cuda-python) on the GPU machine",
            ) from exc
        return PyCudaApi()
    return CudaPythonApi(runtime)


class CudaPythonApi:
    """cuda-python's runtime API: every call returns (error, *values)."""

    name = "cuda-python"

    def __init__(self, rt: ModuleType) -> None:
        self.rt = rt
        count = self._check(rt.cudaGetDeviceCount(), "finding a GPU")
        if not count:
            raise UserError("no CUDA device is visible", DRIVER_FIX)

    def _check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            reason = self.rt.cudaGetErrorString(err)[1].decode()
            raise UserError(f"CUDA failed while {what} ({reason})", DRIVER_FIX)
        return values[0] if len(values) == 1 else values

    def compute_capability(self) -> tuple[int, int]:
        device = self._check(self.rt.cudaGetDevice(), "selecting the GPU")
        props = self._check(self.rt.cudaGetDeviceProperties(device), "reading the GPU's properties")
        return int(props.major), int(props.minor)

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(nbytes, 1)), f"allocating {nbytes} bytes"))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr), "freeing device memory")

    def stream(self) -> Any:
        return self._check(self.rt.cudaStreamCreate(), "creating a stream")

    def event(self) -> Any:
        return self._check(self.rt.cudaEventCreate(), "creating an event")

    def record(self, event: Any, stream: Any) -> None:
        self._check(self.rt.cudaEventRecord(event, stream), "recording an event")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._check(self.rt.cudaEventElapsedTime(start, end), "reading an event time"))

    def synchronize(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "waiting for the GPU")

    def htod(self, ptr: int, array: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream), "copying to the GPU")

    def dtoh(self, array: np.ndarray, ptr: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream), "copying from the GPU")

    def begin_capture(self, stream: Any) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.rt.cudaStreamBeginCapture(stream, mode), "starting CUDA graph capture")

    def end_capture(self, stream: Any) -> Any:
        graph = self._check(self.rt.cudaStreamEndCapture(stream), "ending CUDA graph capture")
        return self._check(self.rt.cudaGraphInstantiate(graph, 0), "instantiating the CUDA graph")

    def launch_graph(self, graph: Any, stream: Any) -> None:
        self._check(self.rt.cudaGraphLaunch(graph, stream), "launching the CUDA graph")


class PyCudaApi:
    """pycuda's driver API, for machines that have it instead of cuda-python."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as cuda  # noqa: PLC0415

        try:
            cuda.init()
            if cuda.Device.count() == 0:
                raise UserError("no CUDA device is visible", DRIVER_FIX)
            self.context = cuda.Device(0).retain_primary_context()
            self.context.push()
        except cuda.Error as exc:
            raise UserError(f"CUDA failed while finding a GPU ({exc})", DRIVER_FIX) from exc
        self.cuda = cuda
        self._objects: dict[int, Any] = {}  # pycuda objects by handle, kept alive while in use

    def _keep(self, obj: Any, handle: int) -> int:
        self._objects[handle] = obj
        return handle

    def compute_capability(self) -> tuple[int, int]:
        major, minor = self.cuda.Context.get_device().compute_capability()
        return int(major), int(minor)

    def malloc(self, nbytes: int) -> int:
        allocation = self.cuda.mem_alloc(max(nbytes, 1))
        return self._keep(allocation, int(allocation))

    def free(self, ptr: int) -> None:
        self._objects.pop(ptr).free()

    def stream(self) -> int:
        stream = self.cuda.Stream()
        return self._keep(stream, stream.handle)

    def event(self) -> int:
        event = self.cuda.Event()
        return self._keep(event, event.handle)

    def record(self, event: int, stream: int) -> None:
        self._objects[event].record(self._objects[stream])

    def elapsed_ms(self, start: int, end: int) -> float:
        return float(self._objects[end].time_since(self._objects[start]))

    def synchronize(self, stream: int) -> None:
        self._objects[stream].synchronize()

    def htod(self, ptr: int, array: np.ndarray, stream: int) -> None:
        self.cuda.memcpy_htod_async(ptr, array, self._objects[stream])

    def dtoh(self, array: np.ndarray, ptr: int, stream: int) -> None:
        self.cuda.memcpy_dtoh_async(array, ptr, self._objects[stream])

    def begin_capture(self, stream: int) -> None:
        raise _no_graphs()

    def end_capture(self, stream: int) -> Any:
        raise _no_graphs()

    def launch_graph(self, graph: Any, stream: int) -> None:
        raise _no_graphs()


def _no_graphs() -> UserError:
    return UserError("CUDA graphs need cuda-python, and pycuda is what is installed", "pip install cuda-python")
