"""``tod-deploy doctor``: what this machine can run, and what to install for the rest.

Why: the heavy paths (TensorRT engines, the CUDA kernel, the 1-bit CPU kernel's ISA paths) fail far
from their cause on a machine without a GPU or with a broken install. One quick look at the CPU, the
libraries, the GPU and the CUDA compilers says up front which ``bench`` backends work here and names
the install for the others. Every probe is fast - without a GPU neither torch nor
onnxruntime-extensions is imported (about 1.5 s each) - and none raises: a failing probe is reported
with its reason. ``doctor --gpu`` (``trt/gpu_selftest.py``) goes on to run the CUDA kernel.
"""

from __future__ import annotations

import ast
import importlib.util
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from tod_deploy.environment import cpu_flags, cpu_model, installed_version, parse_cpuinfo
from tod_deploy.errors import UserError, first_line
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.quant.int8 import eight_bit_sums_here
from tod_deploy.trt import kernels
from tod_deploy.trt.cuda_driver import GpuProbe, probe_gpus

GPU_INSTALL = "pip install 'tod-deploy[gpu]' on a machine with an NVIDIA GPU"
# /proc/cpuinfo flags the 1-bit CPU kernel's paths need: amx = the first two and the first four
# avx512 ones (and Linux's permission to use tile data), avx512 = the five avx512 ones, avx2, scalar = popcnt.
KERNEL_FLAGS = (
    "amx_tile",
    "amx_int8",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vpopcntdq",
    "avx2",
    "popcnt",
)
VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}


@dataclass(frozen=True)
class CpuReport:
    model: str
    vendor: str
    threads: int
    flags: dict[str, bool]  # KERNEL_FLAGS as /proc/cpuinfo lists them (empty where there is none)
    kernel_path: str | None  # the ISA path the 1-bit CPU kernel takes here
    kernel_paths: tuple[str, ...]  # every path this CPU and build can run, best first
    problem: str = ""  # why the kernel path is unknown


@dataclass(frozen=True)
class Component:
    """A library or tool: its version when usable, else the problem and what to install."""

    name: str
    version: str | None = None
    detail: str = ""
    problem: str = ""
    install: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass(frozen=True)
class Backend:
    """A ``bench`` backend: usable here or not, on what, and what it would take."""

    name: str
    usable: bool
    runs_on: str = ""
    reason: str = ""  # why it is not usable
    install: str = ""


@dataclass(frozen=True)
class DoctorReport:
    cpu: CpuReport
    gpu: GpuProbe
    onnxruntime: Component
    onnxruntime_providers: tuple[str, ...]
    onnxruntime_extensions: Component
    openvino: Component
    torch: Component
    torch_cuda_build: str | None  # torch.version.cuda: None for a CPU-only build
    torch_cuda_available: bool
    cuda_python: Component
    nvcc: Component
    nvrtc: Component
    tensorrt: Component
    tritonserver: Component
    bench_backends: tuple[Backend, ...]

    def components(self) -> tuple[Component, ...]:
        return (self.onnxruntime, self.onnxruntime_extensions, self.openvino, self.torch, self.cuda_python, self.nvcc,
                self.nvrtc, self.tensorrt, self.tritonserver)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bench_backends"] = {backend["name"]: backend for backend in data["bench_backends"]}
        return data


# --- probes (each fast, none raises) -------------------------------------------------------------


def probe_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuReport:
    try:
        fields = parse_cpuinfo(cpuinfo.read_text())
    except OSError:  # not Linux
        fields = {}
    flags = set(fields.get("flags", "").split())
    vendor_id = fields.get("vendor_id", "")
    try:
        paths, path, problem = binary_conv_cpu.supported_isas(), binary_conv_cpu.current_isa(), ""
    except UserError as exc:  # the compiled kernel is not built
        paths, path, problem = (), None, exc.line()
    return CpuReport(
        model=cpu_model(),
        vendor=VENDORS.get(vendor_id, vendor_id or platform.machine()),
        threads=binary_conv_cpu.default_threads(),
        flags={flag: flag in flags for flag in KERNEL_FLAGS} if flags else {},
        kernel_path=path,
        kernel_paths=paths,
        problem=problem,
    )


def probe_onnxruntime() -> tuple[Component, tuple[str, ...]]:
    if importlib.util.find_spec("onnxruntime") is None:
        return Component("onnxruntime", problem="not installed", install="pip install onnxruntime"), ()
    try:
        import onnxruntime  # noqa: PLC0415 - a probe: its failure is reported, not raised

        providers = tuple(onnxruntime.get_available_providers())
    except Exception as exc:
        problem = f"fails to import ({first_line(exc)})"
        return Component("onnxruntime", problem=problem, install="pip install --force-reinstall onnxruntime"), ()
    details = ["providers: " + ", ".join(providers), eight_bit_sums_here(cpu_flags())]
    return Component("onnxruntime", onnxruntime.__version__, "; ".join(d for d in details if d)), providers


def probe_onnxruntime_extensions() -> Component:
    """By its metadata only: importing it takes about 1.5 s."""
    version = installed_version("onnxruntime-extensions")
    if version is None:
        install = "pip install onnxruntime-extensions"
        return Component("onnxruntime-extensions", problem="not installed", install=install)
    return Component("onnxruntime-extensions", version, "runs tod::BinaryConv2d nodes in onnxruntime")


def probe_openvino() -> Component:
    """OpenVINO (the optional ``openvino`` extra) and what its CPU plugin offers here (BF16, BIN)."""
    from tod_deploy.backends.openvino_runner import INSTALL

    if importlib.util.find_spec("openvino") is None:
        return Component("OpenVINO", problem="not installed", install=INSTALL)
    try:
        import openvino  # noqa: PLC0415 - a probe: its failure is reported, not raised

        capabilities = list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception as exc:  # a broken install or a CPU plugin that does not load
        return Component("OpenVINO", problem=f"fails to load ({first_line(exc)})", install=f"reinstall: {INSTALL}")
    default = "bf16" if "BF16" in capabilities else "fp32"
    detail = f"CPU: {', '.join(capabilities)}; --precision auto runs {default}"
    return Component("OpenVINO", openvino.__version__.split("-")[0], detail)


def torch_cuda_build() -> str | None:
    """``torch.version.cuda`` without importing torch (1.5 s): torch/version.py is a generated file of literals."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    try:
        tree = ast.parse(Path(spec.origin).with_name("version.py").read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "cuda" and node.value is not None:
            value = ast.literal_eval(node.value)
            return str(value) if value else None
    return None


def probe_torch(gpu: GpuProbe) -> tuple[Component, str | None, bool]:
    """torch's version, its CUDA build, and whether torch.cuda works (asked of torch only when a GPU is there)."""
    version = installed_version("torch")
    if version is None:
        return Component("torch", problem="not installed", install="pip install torch==2.14.1"), None, False
    build = torch_cuda_build()
    if not gpu.devices:
        available, why = False, "no NVIDIA GPU is visible"
    elif build is None:
        available, why = False, "a CPU-only build"
    else:
        try:
            import torch  # noqa: PLC0415 - only with a GPU, where the answer needs torch itself

            available, why = torch.cuda.is_available(), "torch.cuda.is_available() is False"
        except Exception as exc:
            available, why = False, first_line(exc)
    state = "available" if available else f"unavailable ({why})"
    detail = f"{f'CUDA {build}' if build else 'CPU-only'} build; torch.cuda {state}"
    return Component("torch", version, detail), build, available


def probe_cuda_python() -> Component:
    version = installed_version("cuda-bindings") or installed_version("cuda-python")
    if version is None:
        return Component("cuda-python", problem="not installed", install=GPU_INSTALL)
    return Component("cuda-python", version, "driver API, runtime, NVRTC bindings")


def probe_nvcc() -> Component:
    path = kernels.find_nvcc()
    if path is None:
        return Component(
            "nvcc",
            problem="not on PATH or in $CUDA_HOME/bin",
            install="the CUDA toolkit; without it NVRTC (cuda-python) compiles the 1-bit CUDA kernel",
        )
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = f"{path} does not run ({first_line(exc)})"
        return Component("nvcc", problem=problem, install="reinstall the CUDA toolkit")
    release = re.search(r"release (\d+\.\d+)", done.stdout)
    return Component("nvcc", release.group(1) if release else "unknown", path)


def probe_nvrtc() -> Component:
    try:
        from cuda.bindings import nvrtc  # noqa: PLC0415 - optional (the gpu extra)

        status, major, minor = nvrtc.nvrtcVersion()
    except ImportError:
        return Component("NVRTC", problem="cuda-python is not installed", install="pip install cuda-python")
    except Exception as exc:  # the bindings load libnvrtc on first use
        return Component("NVRTC", problem=f"libnvrtc cannot be loaded ({type(exc).__name__})",
                         install="pip install 'cuda-toolkit[nvrtc]' or the CUDA toolkit")  # fmt: skip
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return Component("NVRTC", problem=f"nvrtcVersion failed ({status})", install="reinstall cuda-python")
    return Component("NVRTC", f"{major}.{minor}", "compiles the 1-bit CUDA kernel where there is no nvcc")


def probe_tensorrt() -> Component:
    """Its version; an install that is there but fails to import (missing libnvinfer, ...) says why."""
    if importlib.util.find_spec("tensorrt") is None:
        return Component("TensorRT", problem="not installed", install=GPU_INSTALL)
    try:
        import tensorrt  # noqa: PLC0415 - optional and heavy
    except Exception as exc:  # ImportError of its libraries, OSError, ...
        return Component(
            "TensorRT",
            problem=f"installed but fails to import ({type(exc).__name__}: {first_line(exc)})",
            install="reinstall TensorRT 11: pip install --force-reinstall 'tensorrt>=11'",
        )
    return Component("TensorRT", getattr(tensorrt, "__version__", "unknown"))


def probe_tritonserver() -> Component:
    """The Triton Inference Server ``tod-deploy serve`` would start, and the backends it has."""
    from tod_deploy.targets.triton_server import find_tritonserver  # noqa: PLC0415 - serving only

    try:
        install = find_tritonserver()
    except UserError as exc:
        return Component("tritonserver", problem="not found", install=exc.fix)
    backends = sorted(p.name for p in install.backends.iterdir() if p.is_dir()) if install.backends.is_dir() else []
    version = installed_version("nvidia-pytriton") if "pytriton" in install.source else None
    detail = f"{install.source}; backends: {', '.join(backends) or 'none'}"
    return Component("tritonserver", f"nvidia-pytriton {version}" if version else "on PATH", detail)


def tensorrt_backend(*, tensorrt: Component, cuda_python: Component, gpu: GpuProbe) -> Backend:
    """bench's tensorrt backend needs a GPU, TensorRT and CUDA bindings; the first missing one is the reason."""
    if not gpu.devices:
        return Backend("tensorrt", False, reason=f"no NVIDIA GPU is visible ({gpu.problem})", install=GPU_INSTALL)
    if not tensorrt.ok:
        return Backend("tensorrt", False, reason=f"TensorRT is {tensorrt.problem}", install=tensorrt.install)
    if not cuda_python.ok:
        return Backend("tensorrt", False, reason=f"cuda-python is {cuda_python.problem}", install=cuda_python.install)
    return Backend("tensorrt", True, f"{gpu.devices[0].name} (TensorRT {tensorrt.version})")


def bench_backends(
    *, torch: Component, onnxruntime: Component, extensions: Component, openvino: Component, tensorrt: Component,
    cuda_python: Component, gpu: GpuProbe,
) -> tuple[Backend, ...]:  # fmt: skip
    """What ``bench --backend`` can use here: torch, onnxruntime and openvino run on the CPU, tensorrt on a GPU."""
    ort_runs_on = "CPUExecutionProvider"
    if not extensions.ok:
        ort_runs_on += " (tod::BinaryConv2d models need onnxruntime-extensions)"
    return (
        _library_backend("torch", torch, runs_on="CPU"),
        _library_backend("onnxruntime", onnxruntime, runs_on=ort_runs_on),
        _library_backend("openvino", openvino, runs_on="CPU (tod::BinaryConv2d as BinaryConvolution)"),
        tensorrt_backend(tensorrt=tensorrt, cuda_python=cuda_python, gpu=gpu),
    )


def _library_backend(name: str, library: Component, *, runs_on: str) -> Backend:
    if library.ok:
        return Backend(name, True, runs_on)
    return Backend(name, False, reason=f"{library.name} is {library.problem}", install=library.install)


def doctor_report() -> DoctorReport:
    """Every probe, once."""
    gpu = probe_gpus()
    onnxruntime, providers = probe_onnxruntime()
    extensions = probe_onnxruntime_extensions()
    openvino = probe_openvino()
    torch, build, torch_cuda = probe_torch(gpu)
    cuda_python, tensorrt = probe_cuda_python(), probe_tensorrt()
    backends = bench_backends(torch=torch, onnxruntime=onnxruntime, extensions=extensions, openvino=openvino,
                              tensorrt=tensorrt, cuda_python=cuda_python, gpu=gpu)  # fmt: skip
    return DoctorReport(
        cpu=probe_cpu(),
        gpu=gpu,
        onnxruntime=onnxruntime,
        onnxruntime_providers=providers,
        onnxruntime_extensions=extensions,
        openvino=openvino,
        torch=torch,
        torch_cuda_build=build,
        torch_cuda_available=torch_cuda,
        cuda_python=cuda_python,
        nvcc=probe_nvcc(),
        nvrtc=probe_nvrtc(),
        tensorrt=tensorrt,
        tritonserver=probe_tritonserver(),
        bench_backends=backends,
    )


# --- tables --------------------------------------------------------------------------------------


def _gpu_rows(gpu: GpuProbe) -> list[tuple[str, str, str]]:
    if not gpu.devices:
        return [("GPU", "none", gpu.problem)]
    rows = [
        (f"GPU {d.index}", d.name, f"compute capability {d.compute_capability[0]}.{d.compute_capability[1]}, "
                                   f"{d.memory_bytes / 2**30:.1f} GiB")
        for d in gpu.devices
    ]  # fmt: skip
    release = gpu.driver_version or "-"
    return [*rows, ("NVIDIA driver", release, f"CUDA {gpu.cuda_driver} (via {gpu.source})" if gpu.cuda_driver else "")]


def doctor_tables(report: DoctorReport) -> list[Table]:
    """This machine (CPU, GPU, libraries, compilers), then what bench can use and what to install for the rest."""
    machine = Table(title="this machine")
    for column in ("", "found", "details"):
        machine.add_column(column)
    cpu = report.cpu
    flags = ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in cpu.flags.items()) or "flags unknown"
    model = cpu.model if cpu.vendor in cpu.model else f"{cpu.model} ({cpu.vendor})"
    machine.add_row("CPU", escape(model), f"{cpu.threads} threads; {flags}")
    paths = f"paths this CPU can run: {', '.join(cpu.kernel_paths)}" if cpu.kernel_paths else cpu.problem
    machine.add_row("1-bit CPU kernel", cpu.kernel_path or "unavailable", paths)
    for row in _gpu_rows(report.gpu):
        machine.add_row(*map(escape, row))
    for component in report.components():
        details = component.detail if component.ok else f"{component.problem}; install: {component.install}"
        machine.add_row(component.name, component.version or "missing", escape(details))
    backends = Table(title="tod-deploy bench backends")
    for column in ("backend", "usable", "runs on", "to use it"):
        backends.add_column(column)
    for backend in report.bench_backends:
        advice = "" if backend.usable else f"{backend.reason}: {backend.install}"
        backends.add_row(backend.name, "yes" if backend.usable else "no", escape(backend.runs_on), escape(advice))
    return [machine, backends]
