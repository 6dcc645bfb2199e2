"""A thin layer over cuda-python's driver API (``cuda.bindings.driver``): find GPUs, load PTX, launch.

Why the driver API: ``doctor`` must name the GPU and driver without TensorRT and without importing
torch (about 1.5 s), and ``doctor --gpu`` must launch the TensorRT plugin's PTX with exactly the
parameters TensorRT's AOT launcher passes, which is what ``cuLaunchKernel`` takes. What to launch,
and with which arguments, is decided by pure functions elsewhere (``trt/gpu_selftest.py``); this
module only makes the calls. Every binding returns ``(CUresult, *values)``, checked by :func:`call`.

``nvidia-smi`` answers where cuda-python is not installed, and gives the driver's release number,
which the driver API does not.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from tod_deploy.trt.kernels import Launch

DRIVER_API = "cuda-python driver API"
NVIDIA_SMI = "nvidia-smi"
NVIDIA_SMI_QUERY = ("--query-gpu=index,name,compute_cap,memory.total,driver_version", "--format=csv,noheader,nounits")
NVIDIA_SMI_TIMEOUT_S = 10


class CudaError(RuntimeError):
    """A driver call failed; ``name`` is the CUresult's name, e.g. ``CUDA_ERROR_UNSUPPORTED_PTX_VERSION``."""

    def __init__(self, what: str, name: str) -> None:
        self.name = name
        super().__init__(f"{what} failed with {name}")


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int


@dataclass(frozen=True)
class GpuProbe:
    """The GPUs this process can use, or why it can use none (``problem``)."""

    devices: tuple[GpuDevice, ...] = ()
    cuda_driver: str | None = None  # the CUDA version the driver supports, e.g. "13.0"
    driver_version: str | None = None  # the NVIDIA driver release, e.g. "580.65.06" (from nvidia-smi)
    source: str = ""  # which probe answered
    problem: str = ""


def result_name(code: Any) -> str:
    return getattr(code, "name", None) or f"CUresult {int(code)}"


def call(result: tuple, what: str) -> Any:
    """Check a binding's ``(CUresult, *values)``; return its one value, a tuple of several, or None."""
    code, *values = result
    if int(code) != 0:  # CUresult.CUDA_SUCCESS
        raise CudaError(what, result_name(code))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_version_text(version: int) -> str:
    """``cuDriverGetVersion``'s 1000 * major + 10 * minor -> "major.minor"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def parse_nvidia_smi(text: str) -> tuple[tuple[GpuDevice, ...], str | None]:
    """The CSV of :data:`NVIDIA_SMI_QUERY` -> devices and the driver release (rows it cannot read are skipped)."""
    devices, release = [], None
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 5:
            continue
        index, name, capability, memory_mib, release = fields
        major, _, minor = capability.partition(".")
        if not (index.isdigit() and major.isdigit() and minor.isdigit() and memory_mib.isdigit()):
            continue
        devices.append(GpuDevice(int(index), name, (int(major), int(minor)), int(memory_mib) * 2**20))
    return tuple(devices), release


def _nvidia_smi() -> str | None:
    """nvidia-smi's answer to the query, or None when it is absent or fails (no driver, no device)."""
    path = shutil.which(NVIDIA_SMI)
    if path is None:
        return None
    try:
        done = subprocess.run([path, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _device(driver: Any, index: int) -> GpuDevice:
    device = call(driver.cuDeviceGet(index), "cuDeviceGet")
    name = call(driver.cuDeviceGetName(256, device), "cuDeviceGetName")
    attribute = driver.CUdevice_attribute
    capability = (
        attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
    )
    major, minor = (call(driver.cuDeviceGetAttribute(which, device), "cuDeviceGetAttribute") for which in capability)
    memory = call(driver.cuDeviceTotalMem(device), "cuDeviceTotalMem")
    text = bytes(name).split(b"\0", 1)[0].decode(errors="replace").strip()
    return GpuDevice(index, text, (int(major), int(minor)), int(memory))


def _probe_driver_api(driver: Any) -> GpuProbe:
    try:
        init = driver.cuInit(0)
    except Exception as exc:  # the bindings load libcuda on first use and raise when the driver is absent
        problem = f"libcuda, the NVIDIA driver library, cannot be loaded: {type(exc).__name__}"
        return GpuProbe(source=DRIVER_API, problem=problem)
    try:
        call(init, "cuInit")
        version = call(driver.cuDriverGetVersion(), "cuDriverGetVersion")
        devices = tuple(_device(driver, index) for index in range(call(driver.cuDeviceGetCount(), "cuDeviceGetCount")))
    except CudaError as exc:
        return GpuProbe(source=DRIVER_API, problem=str(exc))
    problem = "" if devices else "the driver lists no CUDA device (check CUDA_VISIBLE_DEVICES)"
    return GpuProbe(devices, cuda_version_text(int(version)), source=DRIVER_API, problem=problem)


def probe_gpus() -> GpuProbe:
    """Which GPUs are visible, by the driver API, else nvidia-smi; never raises."""
    smi = _nvidia_smi()
    smi_devices, release = parse_nvidia_smi(smi) if smi else ((), None)
    try:
        from cuda.bindings import driver  # noqa: PLC0415 - optional (the gpu extra)
    except ImportError:
        if smi_devices:
            return GpuProbe(smi_devices, driver_version=release, source=NVIDIA_SMI)
        reason = "nvidia-smi lists no GPU" if shutil.which(NVIDIA_SMI) else "nvidia-smi is not on PATH"
        return GpuProbe(source=NVIDIA_SMI, problem=f"cuda-python is not installed and {reason}")
    return replace(_probe_driver_api(driver), driver_version=release)


class PtxModule:
    """PTX loaded into a device's primary context, the context torch's runtime uses.

    Why the primary context: the kernel then reads and writes torch's device tensors through their
    ``data_ptr()`` and runs on torch's streams, so torch can allocate, copy and time around it.
    Use as a context manager; the module is unloaded and the context released on exit.
    """

    def __init__(self, ptx: str, function: str, *, device_index: int) -> None:
        from cuda.bindings import driver  # noqa: PLC0415 - optional (the gpu extra)

        self._driver = driver
        self._module: Any = None
        call(driver.cuInit(0), "cuInit")
        self._device = call(driver.cuDeviceGet(device_index), "cuDeviceGet")
        context = call(driver.cuDevicePrimaryCtxRetain(self._device), "cuDevicePrimaryCtxRetain")
        try:
            call(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
            image = ctypes.create_string_buffer(ptx.encode())  # NUL-terminated, as cuModuleLoadData reads PTX
            self._module = call(driver.cuModuleLoadData(ctypes.addressof(image)), "cuModuleLoadData")
            self._function = call(driver.cuModuleGetFunction(self._module, function.encode()), "cuModuleGetFunction")
        except BaseException:
            self.close()
            raise

    def launch(self, launch: Launch, params: ctypes.Array, *, stream: int) -> None:
        """``cuLaunchKernel`` with ``params`` as kernelParams (one pointer per kernel parameter)."""
        driver = self._driver
        call(
            driver.cuLaunchKernel(
                self._function, *launch.grid, *launch.block, launch.shared_mem, driver.CUstream(stream),
                ctypes.addressof(params), 0,
            ),
            "cuLaunchKernel",
        )  # fmt: skip

    def close(self) -> None:
        if self._module is not None:
            call(self._driver.cuModuleUnload(self._module), "cuModuleUnload")
            self._module = None
        if self._device is not None:
            call(self._driver.cuDevicePrimaryCtxRelease(self._device), "cuDevicePrimaryCtxRelease")
            self._device = None

    def __enter__(self) -> PtxModule:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.close()
        except CudaError:
            if exc is None:
                raise  # otherwise the error that ended the block (e.g. a kernel fault) is the one to see
