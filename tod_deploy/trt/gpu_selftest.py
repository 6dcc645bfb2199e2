"""``tod-deploy doctor --gpu``: the ``tod::BinaryConv2d`` CUDA kernel on this machine's GPU, no TensorRT needed.

Why: inside a TensorRT engine a wrong kernel argument or a wrong bit shows up as a wrong detection,
far from its cause. Here the PTX the AOT plugin embeds is compiled for this GPU and launched through
cuda-python with exactly what the plugin passes - the six input pointers, the 21 int32 of
``kernels.KERNEL_INT_ARGS``, the output pointer; grid and block from the plugin's own ``launch``;
W_packed as the int32 words TensorRT hands over; an absent residual or slope as the empty tensor -
and its output is compared bit for bit with the NumPy reference over the grid the tests use
(``ops/binary_conv_cases.py``), then with the fused epilogue (residual, relu, prelu) on a few of its
geometries. Then it is timed at the four ResNet-18 stage shapes against cuDNN float32 (IEEE and TF32
math), cuDNN float16 and an int8 GEMM of the same convolution.

Every decision (the configurations and their inputs, the parameter array, the comparison, the ratios,
the report) is a pure function tested on the CPU; torch and the driver calls are the last layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from tod_deploy.artifacts import staged, write_json
from tod_deploy.environment import installed_version
from tod_deploy.errors import UserError, first_line
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.ops.binary_conv_cases import (
    CUDA_CASES,
    EDGE_CASE,
    RESNET18_STAGES,
    SIGNS,
    Geometry,
    case_id,
    edge_case_inputs,
    epilogue_inputs,
    make_inputs,
    sign_pairs,
)
from tod_deploy.ops.binary_conv_ref import ACTIVATIONS, BinaryConvAttrs, binary_conv2d_ref, pack_weights, scale_sums
from tod_deploy.trt import kernels, plugins
from tod_deploy.trt.cuda_driver import CudaError, GpuDevice, GpuProbe, PtxModule

DEFAULT_REPORT = Path("doctor-gpu.json")
NO_GPU_FIX = (
    "run doctor --gpu on a machine with an NVIDIA GPU and its driver (nvidia-smi lists the GPU); "
    "without one, tod-deploy runs on the CPU (bench --backend torch,onnxruntime)"
)
REFERENCE = "NumPy reference"
# Timed per stage; the 1-bit kernel first, the others are what it is compared with.
OURS = "kernel"
TIMED = {
    OURS: "tod_binary_conv2d (1-bit, this kernel)",
    "cudnn_fp32": "cuDNN conv float32 (IEEE math)",
    "cudnn_tf32": "cuDNN conv float32 (TF32 math)",
    "cudnn_fp16": "cuDNN conv float16",
    "int8_gemm": "int8 GEMM (torch._int_mm), conv as GEMM",
}
WARMUP, REPS, LAUNCHES_PER_REP = 3, 15, 10
# GPU cycles (a few ms) of torch.cuda._sleep queued before each timed rep: the rep's launches queue up behind
# it, so the events time the GPU running them back to back, not Python's launch rate.
QUEUE_AHEAD_CYCLES = 5_000_000
PTX_TOO_NEW = "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"
NONE = np.zeros((0,), dtype=np.float32)  # an absent residual or slope, as the plugin gets it (op version 2)


def require_gpu(probe: GpuProbe) -> GpuDevice:
    """The GPU the self-test runs on (the first visible one), or the one-line error saying why there is none."""
    if not probe.devices:
        raise UserError(f"no NVIDIA GPU is visible ({probe.problem or 'no device found'})", NO_GPU_FIX)
    return probe.devices[0]


# --- what is launched ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelCase:
    """One launch of the grid: a geometry, its sign conventions, whether it takes the NaN/tie inputs, and its
    fused epilogue (op version 2: the activation, and whether a residual is added)."""

    geometry: Geometry
    zero_sign: int
    pad_value: int
    edge: bool = False
    activation: str = "none"
    residual: bool = False

    @property
    def epilogue(self) -> str:
        parts = [self.activation] if self.activation != "none" else []
        return "+".join([*parts, "residual"] if self.residual else parts)

    @property
    def group(self) -> str:
        group = case_id(self.geometry) + (" nan+ties, zero bias" if self.edge else "")
        return f"{group} {self.epilogue}" if self.epilogue else group

    @property
    def name(self) -> str:
        return f"{self.group} zero_sign={self.zero_sign:+d} pad_value={self.pad_value:+d}"

    def attrs(self) -> BinaryConvAttrs:
        return dataclasses.replace(self.geometry.attrs(self.zero_sign, self.pad_value), activation=self.activation)


# The fused epilogue's launches: two grid geometries (odd channels, stride 2; two channel tiles per group),
# every activation with a residual, and relu / prelu without one; inputs from binary_conv_cases.epilogue_inputs.
# A GPU's float add returns the canonical NaN, not an operand's payload: no NaN residuals here.
EPILOGUE_GEOMETRIES = (CUDA_CASES[1], CUDA_CASES[-2])
EPILOGUES = (*((activation, True) for activation in ACTIVATIONS), ("relu", False), ("prelu", False))


def kernel_cases() -> list[KernelCase]:
    """The host emulation's grid: every CUDA geometry with every (zero_sign, pad_value), then the edge case,
    then the epilogue cases (one sign pair each)."""
    grid = [KernelCase(geo, zero_sign, pad_value) for geo in CUDA_CASES for zero_sign, pad_value in sign_pairs()]
    edge = [KernelCase(EDGE_CASE, zero_sign, 0, edge=True) for zero_sign in SIGNS]
    epilogue = [KernelCase(geo, -1, 0, activation=activation, residual=residual)
                for geo in EPILOGUE_GEOMETRIES for activation, residual in EPILOGUES]  # fmt: skip
    return grid + edge + epilogue


@dataclass(frozen=True)
class CaseData:
    """One launch's inputs on the host, and the output it must write (``expected``, None when unknown)."""

    x: np.ndarray
    w_words: np.ndarray
    alpha: np.ndarray
    bias: np.ndarray
    attrs: BinaryConvAttrs
    expected: np.ndarray | None
    expected_from: str  # where ``expected`` comes from, or why there is none
    residual: np.ndarray = field(default_factory=lambda: NONE.copy())  # NONE: no residual
    slope: np.ndarray = field(default_factory=lambda: NONE.copy())  # Cout values for prelu, else NONE

    @property
    def has_residual(self) -> bool:
        return self.residual.size > 0

    @property
    def out_channels(self) -> int:
        return int(self.w_words.shape[0])

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.x.shape[0], self.out_channels, *self.attrs.output_size(*self.x.shape[2:]))


def tensorrt_words(packed: np.ndarray) -> np.ndarray:
    """W_packed as TensorRT hands it to the plugin: int32 words, same little-endian bytes (plugins.tensorrt_view)."""
    return np.ascontiguousarray(packed, dtype=np.uint8).view("<i4")


def case_data(case: KernelCase) -> CaseData:
    x, w, alpha, bias = edge_case_inputs() if case.edge else make_inputs(case.geometry)
    attrs = case.attrs()
    residual = slope = None
    if case.epilogue:  # the residual and slope the tests use, for Y before the epilogue
        _, y = binary_conv2d_ref(x, w, alpha, bias, dataclasses.replace(attrs, activation="none"))
        residual, slope = epilogue_inputs(y, case.activation)
        residual = residual if case.residual else None
    _, expected = binary_conv2d_ref(x, w, alpha, bias, attrs, residual=residual, slope=slope)
    return CaseData(x, tensorrt_words(pack_weights(w, case.zero_sign)), alpha, bias, attrs, expected, REFERENCE,
                    *(NONE.copy() if a is None else a for a in (residual, slope)))  # fmt: skip


def cpu_kernel_expected(
    x: np.ndarray, packed: np.ndarray, alpha: np.ndarray, bias: np.ndarray, attrs: BinaryConvAttrs
) -> tuple[np.ndarray | None, str]:
    """Y at a stage shape, where the NumPy reference would take minutes: the compiled CPU kernel's integer
    sums (tested bit-exactly against the reference) scaled by the reference's own last step."""
    if not binary_conv_cpu.available():
        return None, "not checked: the compiled CPU kernel is not built here"
    _, sums = binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, attrs, return_sums=True)
    return scale_sums(sums, alpha, bias), f"CPU kernel ({binary_conv_cpu.current_isa()}) sums, scaled as the reference"


def stage_data(channels: int, side: int, *, seed: int = 0) -> CaseData:
    """A ResNet-18 stage conv (3x3, stride 1, pad 1, Cout = Cin, batch 1), inputs with zeros and threshold ties."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, size=(1, channels, side, side)).astype(np.float32) * np.float32(0.25)
    w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
    alpha = (rng.random(channels) + 0.05).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=channels, pads=(1, 1, 1, 1))
    packed = pack_weights(w, attrs.zero_sign)
    expected, source = cpu_kernel_expected(x, packed, alpha, bias, attrs)
    return CaseData(x, tensorrt_words(packed), alpha, bias, attrs, expected, source)


@dataclass(frozen=True)
class KernelCall:
    """Grid, block and the int32 arguments of one launch, as the AOT plugin computes them."""

    launch: kernels.Launch
    int_args: tuple[int, ...]


def plan_call(x_shape: Sequence[int], out_channels: int, attrs: BinaryConvAttrs, *, has_residual: bool) -> KernelCall:
    """The plugin's own ``launch`` and ``kernel_args`` (what ``aot_impl`` returns to TensorRT), on ints."""
    shape = tuple(int(d) for d in x_shape)
    return KernelCall(
        plugins.launch(shape, out_channels, attrs, kernels.ceil_div),
        tuple(plugins.kernel_args(shape, out_channels, attrs, kernels.ceil_div, has_residual=has_residual)),
    )


@dataclass(frozen=True)
class KernelParams:
    """cuLaunchKernel's kernelParams: ``array[i]`` is the address of ``values[i]`` (keep both alive)."""

    values: tuple[ctypes.c_uint64 | ctypes.c_int32, ...]
    array: ctypes.Array


def kernel_params(inputs: Sequence[int], int_args: Sequence[int], outputs: Sequence[int]) -> KernelParams:
    """The kernel's parameters in the AOT launcher's order: input pointers, the int32 arguments, output pointers.

    Pointers are 64-bit (PTX ``.u64``), the arguments 32-bit (``.u32``/``.s32``): a wrong width would
    shift every later parameter, so the counts and ranges are checked here, not discovered on the GPU.
    """
    counts = (len(inputs), len(int_args), len(outputs))
    wanted = (len(kernels.KERNEL_INPUTS), len(kernels.KERNEL_INT_ARGS), len(kernels.KERNEL_OUTPUTS))
    if counts != wanted:
        raise ValueError(f"{kernels.KERNEL_NAME} takes {wanted} (pointers, int32, pointers), got {counts}")
    if any(not -(2**31) <= value < 2**31 for value in int_args):
        raise ValueError(f"{kernels.KERNEL_NAME} int32 arguments out of range: {list(int_args)}")
    values = (
        *(ctypes.c_uint64(ptr) for ptr in inputs),
        *(ctypes.c_int32(value) for value in int_args),
        *(ctypes.c_uint64(ptr) for ptr in outputs),
    )
    return KernelParams(values, (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values)))


# --- what came back -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    """How an output differs from the expected bits: how many elements, and the first (value and bits)."""

    count: int
    index: tuple[int, ...]
    got: str
    want: str


def _float_text(value: np.float32) -> str:
    return f"{float(value)!r} (0x{int(np.float32(value).view(np.uint32)):08x})"


def first_mismatch(got: np.ndarray, want: np.ndarray) -> Mismatch | None:
    """Compare float32 bit patterns (so -0.0 != 0.0 and NaN == the same NaN): the reference is bit-exact."""
    got = np.ascontiguousarray(got, dtype=np.float32)
    want = np.ascontiguousarray(want, dtype=np.float32)
    if got.shape != want.shape:
        return Mismatch(-1, (), f"shape {list(got.shape)}", f"shape {list(want.shape)}")
    differ = got.view(np.uint32) != want.view(np.uint32)
    if not differ.any():
        return None
    index = tuple(int(i) for i in np.argwhere(differ)[0])
    return Mismatch(int(differ.sum()), index, _float_text(got[index]), _float_text(want[index]))


@dataclass(frozen=True)
class CaseResult:
    name: str
    group: str
    x_shape: tuple[int, ...]
    out_channels: int
    launch: kernels.Launch
    mismatch: Mismatch | None

    @property
    def ok(self) -> bool:
        return self.mismatch is None


@dataclass(frozen=True)
class Timing:
    key: str  # one of TIMED
    median_ms: float | None = None
    skipped: str = ""  # why there is no time


@dataclass(frozen=True)
class StageResult:
    channels: int
    side: int
    checked_against: str
    mismatch: Mismatch | None
    timings: tuple[Timing, ...]

    @property
    def name(self) -> str:
        return f"{self.channels}x{self.side}x{self.side}"

    @property
    def ok(self) -> bool:
        return self.mismatch is None

    def speedups(self) -> dict[str, float]:
        """How many times faster the 1-bit kernel ran than each other measurement (their time / ours)."""
        times = {t.key: t.median_ms for t in self.timings if t.median_ms is not None}
        ours = times.pop(OURS, None)
        return {key: ms / ours for key, ms in times.items()} if ours else {}


def im2col_gemm_shape(channels: int, side: int, out_channels: int, kernel: int = 3) -> tuple[int, int, int]:
    """(M, K, N) of a stride-1 'same' convolution written as one GEMM: positions x (C*KH*KW) x Cout."""
    return side * side, channels * kernel * kernel, out_channels


@dataclass(frozen=True)
class SelfTestReport:
    device: GpuDevice
    gpu: GpuProbe
    arch: str
    compiler: str
    versions: dict[str, str]
    cases: tuple[CaseResult, ...]
    stages: tuple[StageResult, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(case.ok for case in self.cases) and all(stage.ok for stage in self.stages)

    def failures(self) -> list[tuple[str, Mismatch]]:
        found = [(case.name, case.mismatch) for case in self.cases if case.mismatch]
        return found + [(f"stage {stage.name}", stage.mismatch) for stage in self.stages if stage.mismatch]

    def to_dict(self) -> dict[str, Any]:
        passed = sum(case.ok for case in self.cases)
        return {
            "ok": self.ok,
            "device": asdict(self.device),
            "driver": {"cuda": self.gpu.cuda_driver, "release": self.gpu.driver_version},
            "arch": self.arch,
            "compiler": self.compiler,
            "versions": self.versions,
            "bit_exact": {"passed": passed, "total": len(self.cases), "against": REFERENCE},
            "configs": [asdict(case) | {"ok": case.ok} for case in self.cases],
            "stages": [_stage_dict(stage) for stage in self.stages],
            "timing": {
                "warmup": WARMUP,
                "reps": REPS,
                "launches_per_rep": LAUNCHES_PER_REP,
                "statistic": "median",
                "queued_behind_cycles": QUEUE_AHEAD_CYCLES,
            },
            "seconds": round(self.seconds, 1),
        }


def _stage_dict(stage: StageResult) -> dict[str, Any]:
    return {
        "input": [1, stage.channels, stage.side, stage.side],
        "out_channels": stage.channels,
        "ok": stage.ok,
        "checked_against": stage.checked_against,
        "mismatch": asdict(stage.mismatch) if stage.mismatch else None,
        "median_ms": {t.key: t.median_ms for t in stage.timings if t.median_ms is not None},
        "skipped": {t.key: t.skipped for t in stage.timings if t.skipped},
        "speedup_vs": stage.speedups(),
        "labels": {t.key: TIMED[t.key] for t in stage.timings},
    }


def summary_line(report: SelfTestReport) -> str:
    """One line: the verdict, the counts and, on failure, the first mismatch."""
    passed = sum(case.ok for case in report.cases)
    where = f"{report.device.name} ({report.arch} PTX)"
    counts = f"{passed}/{len(report.cases)} configurations bit-exact"
    if report.ok:
        return f"GPU self-test passed on {where}: {counts}, {len(report.stages)} stage shapes checked and timed"
    failures = report.failures()
    name, mismatch = failures[0]
    return (
        f"GPU self-test FAILED on {where}: {counts}, {len(failures)} failing; first: {name} at {list(mismatch.index)} "
        f"got {mismatch.got}, want {mismatch.want} ({mismatch.count} elements differ)"
    )


def selftest_tables(report: SelfTestReport) -> list[Table]:
    """The grid by geometry (pass counts), and the stage timings with the 1-bit kernel's speed-ups."""
    grid = Table(title=escape(f"{kernels.KERNEL_NAME} on {report.device.name}: {report.arch} PTX, {report.compiler}"))
    for column in ("configuration", "launches", "bit-exact vs the NumPy reference"):
        grid.add_column(column)
    groups: dict[str, list[CaseResult]] = defaultdict(list)
    for case in report.cases:
        groups[case.group].append(case)
    for group, cases in groups.items():
        passed = sum(case.ok for case in cases)
        verdict = "yes" if passed == len(cases) else f"NO ({len(cases) - passed} differ)"
        grid.add_row(escape(group), str(len(cases)), verdict)
    timings = Table(title="ResNet-18 stage convs (batch 1, 3x3, pad 1, Cout = Cin): median ms (1-bit speed-up)")
    timings.add_column("input")
    for key in TIMED:
        timings.add_column(TIMED[key], justify="right")
    timings.add_column("1-bit output checked against")
    for stage in report.stages:
        speedups, cells = stage.speedups(), {t.key: t for t in stage.timings}
        row = [_timing_cell(cells.get(key), speedups.get(key)) for key in TIMED]
        check = stage.checked_against if stage.ok else f"DIFFERS ({stage.mismatch.count} elements)"
        timings.add_row(stage.name, *map(escape, row), escape(check))
    return [grid, timings]


def _timing_cell(timing: Timing | None, speedup: float | None) -> str:
    if timing is None or timing.median_ms is None:
        return f"skipped: {timing.skipped}" if timing else "-"
    return f"{timing.median_ms:.3f}" + (f" ({speedup:.1f}x)" if speedup is not None else "")


def write_report(report: SelfTestReport, path: Path) -> None:
    """Atomically: a half-written report would look like a finished one."""
    with staged(path) as (tmp,):
        write_json(tmp, report.to_dict())


def ptx_compiler() -> str:
    """What ``kernels.compile_ptx`` uses: nvcc where one is found, else NVRTC."""
    nvcc = kernels.find_nvcc()
    return f"nvcc ({nvcc})" if nvcc else "NVRTC (cuda-python)"


# --- the GPU (torch for buffers, streams and baselines; the driver API for the kernel) ---------------


def run_selftest(gpu: GpuProbe, *, log: Callable[[str], None] = print) -> SelfTestReport:
    """Compile, check every configuration, time the stage shapes; raise UserError where it cannot start."""
    device = require_gpu(gpu)
    torch = _torch_with_cuda()
    started = time.perf_counter()
    arch, compiler = plugins.pick_arch(device.compute_capability), ptx_compiler()
    log(f"compiling {kernels.KERNEL_NAME} for {arch} with {compiler} ...")
    ptx = kernels.compile_ptx(arch)
    torch.cuda.set_device(device.index)
    torch.zeros(1, device="cuda")  # torch makes the primary context current before the driver API joins it
    with _load(ptx, device.index) as module:
        runner = KernelRunner(torch, module)
        cases = kernel_cases()
        log(f"checking {len(cases)} configurations bit-exactly against the NumPy reference ...")
        results = tuple(runner.check(case.name, case.group, case_data(case)) for case in cases)
        stages = []
        for channels, side in RESNET18_STAGES:
            log(f"checking and timing the {channels}x{side}x{side} stage ...")
            stages.append(_stage(runner, channels, side))
    versions = {
        "torch": torch.__version__,
        "cudnn": str(torch.backends.cudnn.version()),
        "cuda-bindings": installed_version("cuda-bindings") or "not installed",
    }
    elapsed = time.perf_counter() - started
    return SelfTestReport(device, gpu, arch, compiler, versions, results, tuple(stages), elapsed)


def _torch_with_cuda() -> Any:
    import torch  # noqa: PLC0415 - 1.5 s; only once a GPU is known to be there

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        raise UserError(
            f"torch {torch.__version__} ({build}) cannot use the GPU (torch.cuda.is_available() is False)",
            "install a CUDA build of torch==2.14.1 that this driver supports (pytorch.org lists them)",
        )
    return torch


def _load(ptx: str, device_index: int) -> PtxModule:
    try:
        return PtxModule(ptx, kernels.KERNEL_NAME, device_index=device_index)
    except CudaError as exc:
        if exc.name == PTX_TOO_NEW:
            raise UserError(
                f"the NVIDIA driver is older than the compiler of the kernel's PTX ({exc})",
                "update the NVIDIA driver, or put an nvcc as old as the driver first on PATH",
            ) from exc
        raise


@dataclass(frozen=True)
class DeviceCase:
    """A case's buffers on the GPU and the launch that reads them (``params`` points into ``buffers``)."""

    buffers: tuple[Any, ...]
    y: Any
    call: KernelCall
    params: KernelParams


class KernelRunner:
    """Uploads a case with torch, launches the kernel on torch's current stream, reads Y back.

    ``module`` is a :class:`PtxModule`; ``device="cpu"`` with a host stand-in for the module is how the
    tests check, without a GPU, that the parameters point at the right buffers.
    """

    def __init__(self, torch: Any, module: PtxModule, *, device: str = "cuda") -> None:
        self.torch = torch
        self.module = module
        self.device = device

    def upload(self, data: CaseData) -> DeviceCase:
        arrays = (data.x, data.w_words, data.alpha, data.bias, data.residual, data.slope)  # KERNEL_INPUTS
        buffers = tuple(self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays)
        y = self.torch.full(data.out_shape, float("nan"), dtype=self.torch.float32, device=self.device)  # unwritten
        call = plan_call(data.x.shape, data.out_channels, data.attrs, has_residual=data.has_residual)
        params = kernel_params([b.data_ptr() for b in buffers], call.int_args, [y.data_ptr()])
        return DeviceCase(buffers, y, call, params)

    def launch(self, case: DeviceCase) -> None:
        on_gpu = self.device.startswith("cuda")
        stream = self.torch.cuda.current_stream().cuda_stream if on_gpu else 0
        self.module.launch(case.call.launch, case.params.array, stream=stream)

    def run(self, data: CaseData) -> tuple[DeviceCase, Mismatch | None]:
        """Upload, launch once, compare Y with ``data.expected`` (when known)."""
        case = self.upload(data)
        self.launch(case)
        got = case.y.cpu().numpy()  # waits for the stream: a kernel fault surfaces here
        return case, first_mismatch(got, data.expected) if data.expected is not None else None

    def check(self, name: str, group: str, data: CaseData) -> CaseResult:
        case, mismatch = self.run(data)
        return CaseResult(name, group, data.x.shape, data.out_channels, case.call.launch, mismatch)

    def median_ms(self, fn: Callable[[], object]) -> float:
        """Median over REPS of (CUDA-event time of LAUNCHES_PER_REP calls) / LAUNCHES_PER_REP, after WARMUP calls."""
        cuda = self.torch.cuda
        queue_ahead = getattr(cuda, "_sleep", None)  # private but long-standing; without it, time as is
        for _ in range(WARMUP):
            fn()
        samples = []
        for _ in range(REPS):
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            if queue_ahead is not None:
                queue_ahead(QUEUE_AHEAD_CYCLES)
            start.record()
            for _ in range(LAUNCHES_PER_REP):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / LAUNCHES_PER_REP)
        return statistics.median(samples)

    def timed(self, key: str, fn: Callable[[], object], *, fp32_precision: str = "ieee") -> Timing:
        """A baseline's time, or why it could not run (e.g. no int8 GEMM for this GPU): never fatal."""
        try:
            with _cudnn(self.torch, fp32_precision):
                return Timing(key, self.median_ms(fn))
        except Exception as exc:  # torch raises RuntimeError and friends for unsupported kernels
            return Timing(key, skipped=first_line(exc))


@contextlib.contextmanager
def _cudnn(torch: Any, fp32_precision: str) -> Iterator[None]:
    """cuDNN autotuned (benchmark mode) with float32 math "ieee" or "tf32", restored afterwards."""
    backends = torch.backends.cudnn
    saved = (backends.benchmark, backends.conv.fp32_precision)
    backends.benchmark, backends.conv.fp32_precision = True, fp32_precision
    try:
        yield
    finally:
        backends.benchmark, backends.conv.fp32_precision = saved


def _stage(runner: KernelRunner, channels: int, side: int) -> StageResult:
    torch = runner.torch
    data = stage_data(channels, side)
    case, mismatch = runner.run(data)
    x = case.buffers[0]
    weight = torch.randn(channels, channels, 3, 3, device="cuda")
    x16, weight16 = x.half(), weight.half()
    m, k, n = im2col_gemm_shape(channels, side, channels)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, device="cuda")
    conv = torch.nn.functional.conv2d
    timings = (
        Timing(OURS, runner.median_ms(lambda: runner.launch(case))),
        runner.timed("cudnn_fp32", lambda: conv(x, weight, padding=1), fp32_precision="ieee"),
        runner.timed("cudnn_tf32", lambda: conv(x, weight, padding=1), fp32_precision="tf32"),
        runner.timed("cudnn_fp16", lambda: conv(x16, weight16, padding=1)),
        runner.timed("int8_gemm", lambda: torch._int_mm(a, b)),
    )
    return StageResult(channels, side, data.expected_from, mismatch, timings)
