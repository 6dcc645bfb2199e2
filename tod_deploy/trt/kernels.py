"""The CUDA kernel of ``tod::BinaryConv2d`` for TensorRT 11's Python AOT plugin: its source, PTX and launch.

TensorRT's AOT plugin path launches exactly one kernel, passing ``(input pointers..., extra int32
args..., output pointers...)``, and does not serialize plugin attributes into the engine. So the
kernel ``tod_binary_conv2d(x, w_packed, alpha, bias, residual, slope, <KERNEL_INT_ARGS>, y)``
receives every attribute as an int32, the threshold as its float32 bit pattern and the activation as
its index in ``ACTIVATIONS``; ``has_residual`` says whether ``residual`` is Y-shaped or the empty
tensor that stands for none (the kernel then never reads it, nor ``slope`` unless the activation is
prelu: an empty tensor's pointer may be null).

The launch arithmetic here runs on Python ints (tests, planning) and on TensorRT's symbolic shape
expressions (``aot_impl``): it uses only ``+``, ``-``, ``*`` and a caller-supplied ``cdiv``
(``tensorrt.plugin.cdiv`` there). Values that are static in every engine (attributes, the output
channel count) are plain ints and may use ordinary integer arithmetic.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tod_deploy.errors import UserError
from tod_deploy.ops.binary_conv_ref import ACTIVATIONS, BinaryConvAttrs

KERNEL_NAME = "tod_binary_conv2d"
# The kernel's parameters between the six input pointers (KERNEL_INPUTS) and the output pointer y,
# all int32, in this order (plugins/binary_conv2d/cuda/binary_conv2d_tile.cuh: ArgIndex).
KERNEL_INT_ARGS = (
    "n",
    "c",
    "h",
    "w",
    "out_channels",
    "out_h",
    "out_w",
    "kernel_h",
    "kernel_w",
    "stride_h",
    "stride_w",
    "pad_top",
    "pad_left",
    "dilation_h",
    "dilation_w",
    "group",
    "zero_sign",
    "pad_value",
    "threshold_bits",
    "activation",
    "has_residual",
)
KERNEL_INPUTS = ("x", "w_packed", "alpha", "bias", "residual", "slope")
KERNEL_OUTPUTS = ("y",)

# Tiling, as in binary_conv2d_tile.cuh (kThreads, kBM, kBN): a block of 128 threads computes
# 32 output positions x 32 output channels of one image and one group.
THREADS = 128
BLOCK_M = 32
BLOCK_N = 32

# sm_75 (Turing, T4): XOR MMA; sm_80 (A100, and by PTX JIT Ampere/Ada GPUs): AND MMA; sm_87 (Jetson
# Orin) and sm_90 (Hopper): AND MMA. A device runs the newest target not above its compute capability.
TARGET_ARCHS = ("sm_75", "sm_80", "sm_87", "sm_90")

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO_ROOT / "plugins" / "binary_conv2d"
CUDA_DIR = PLUGIN_DIR / "cuda"
CUDA_SOURCE = CUDA_DIR / "binary_conv2d.cu"
# Every file the PTX depends on (the hash of their contents keys the compile cache).
CUDA_DEPENDENCIES = (CUDA_SOURCE, CUDA_DIR / "binary_conv2d_tile.cuh", PLUGIN_DIR / "binary_conv2d_core.h")

Dim = Any  # an int or a TensorRT symbolic shape expression
CDiv = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Launch:
    """Grid and block of one kernel launch; ``shared_mem`` is dynamic shared memory in bytes.

    The kernel's shared memory is a static ``__shared__`` tile of about 11.4 KiB (under the 48 KiB
    that needs no opt-in on any arch), so ``shared_mem`` is 0.
    """

    grid: tuple[Dim, Dim, Dim]
    block: tuple[int, int, int]
    shared_mem: int


def ceil_div(a: int, b: int) -> int:
    """Ceiling division of ints, the stand-in for ``tensorrt.plugin.cdiv``."""
    return -(-a // b)


def output_hw(h: Dim, w: Dim, attrs: BinaryConvAttrs, cdiv: CDiv = ceil_div) -> tuple[Dim, Dim]:
    """Output height and width, ``(a // s) + 1`` written as ``cdiv(a + 1, s)`` (equal for a >= 0).

    On ints a kernel that does not fit the input raises UserError, as ``BinaryConvAttrs.output_size``.
    """
    (kh, kw), (sh, sw), (dh, dw) = attrs.kernel_shape, attrs.strides, attrs.dilations
    pt, pl, pb, pr = attrs.pads
    oh = cdiv(h + (pt + pb - dh * (kh - 1)), sh)
    ow = cdiv(w + (pl + pr - dw * (kw - 1)), sw)
    if isinstance(oh, int) and isinstance(ow, int) and (oh < 1 or ow < 1):
        raise UserError(f"BinaryConv2d kernel does not fit a {h}x{w} input", "use a larger input or more padding")
    return oh, ow


def _group_out_channels(out_channels: int, attrs: BinaryConvAttrs) -> int:
    if not isinstance(out_channels, int) or out_channels < 1 or out_channels % attrs.group:
        raise UserError(
            f"BinaryConv2d out_channels={out_channels!r} is not a positive int divisible by group={attrs.group}",
            "pass the static output channel count (W_packed.shape[0])",
        )
    return out_channels // attrs.group


def launch_geometry(
    shape_nchw: Sequence[Dim], out_channels: int, attrs: BinaryConvAttrs, cdiv: CDiv = ceil_div
) -> Launch:
    """Grid ``(cdiv(OH * OW, BLOCK_M), group * ceil(Cout/group / BLOCK_N), N)``, block ``(THREADS, 1, 1)``.

    The same on every arch: the arch only changes which tensor-core instruction a block uses.
    """
    n, _, h, w = shape_nchw
    oh, ow = output_hw(h, w, attrs, cdiv)
    channel_tiles = attrs.group * ceil_div(_group_out_channels(out_channels, attrs), BLOCK_N)
    return Launch(grid=(cdiv(oh * ow, BLOCK_M), channel_tiles, n), block=(THREADS, 1, 1), shared_mem=0)


def float_bits(value: float) -> int:
    """The float32 bit pattern of ``value`` as a signed int32 (how the threshold reaches the kernel).

    Rounding to float32 first is the op's semantics: the reference compares float32 inputs with a
    float32 threshold.
    """
    return struct.unpack("<i", struct.pack("<f", value))[0]


def activation_code(attrs: BinaryConvAttrs) -> int:
    """The kernel's ``activation``: the index in ``ACTIVATIONS`` (binary_conv2d_core.h: enum Activation)."""
    return ACTIVATIONS.index(attrs.activation)


def kernel_int_args(
    shape_nchw: Sequence[Dim],
    out_channels: int,
    attrs: BinaryConvAttrs,
    cdiv: CDiv = ceil_div,
    *,
    has_residual: bool,
) -> list[Dim]:
    """The kernel's extra int32 arguments, in ``KERNEL_INT_ARGS`` order.

    ``has_residual`` is whether the node's residual input is Y-shaped (not the empty tensor).
    """
    n, c, h, w = shape_nchw
    _group_out_channels(out_channels, attrs)
    oh, ow = output_hw(h, w, attrs, cdiv)
    (kh, kw), (sh, sw), (dh, dw) = attrs.kernel_shape, attrs.strides, attrs.dilations
    pt, pl, _, _ = attrs.pads
    values = {
        "n": n,
        "c": c,
        "h": h,
        "w": w,
        "out_channels": out_channels,
        "out_h": oh,
        "out_w": ow,
        "kernel_h": kh,
        "kernel_w": kw,
        "stride_h": sh,
        "stride_w": sw,
        "pad_top": pt,
        "pad_left": pl,
        "dilation_h": dh,
        "dilation_w": dw,
        "group": attrs.group,
        "zero_sign": attrs.zero_sign,
        "pad_value": attrs.pad_value,
        "threshold_bits": float_bits(attrs.threshold),
        "activation": activation_code(attrs),
        "has_residual": int(bool(has_residual)),
    }
    return [values[name] for name in KERNEL_INT_ARGS]


def find_nvcc() -> str | None:
    """nvcc from PATH, else from $CUDA_HOME/bin."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.is_file() else None


def _source_digest() -> str:
    missing = [str(path) for path in CUDA_DEPENDENCIES if not path.is_file()]
    if missing:
        raise UserError(
            f"the BinaryConv2d CUDA sources are missing: {', '.join(missing)}",
            "build PTX from a tod-deploy source checkout (plugins/ is not installed with the wheel)",
        )
    digest = hashlib.sha256()
    for path in CUDA_DEPENDENCIES:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _compute_arch(arch: str) -> str:
    match = re.fullmatch(r"(?:sm|compute)_(\d+)[af]?", arch)
    if not match or int(match.group(1)) < 75:
        raise UserError(f"unsupported CUDA arch {arch!r}", "use sm_75 or newer, e.g. one of " + ", ".join(TARGET_ARCHS))
    return f"compute_{match.group(1)}"


def _first_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[0]


@functools.lru_cache(maxsize=16)
def _compile(arch: str, digest: str) -> str:
    """PTX for one arch with nvcc, or NVRTC where there is no nvcc (a GPU machine with TensorRT and
    cuda-python but no CUDA toolkit); cached in-process by source digest, so an edited source recompiles."""
    nvcc = find_nvcc()
    if nvcc is None:
        return compile_ptx_nvrtc(arch)
    with tempfile.TemporaryDirectory(prefix="tod_ptx_") as tmp:
        out = Path(tmp) / f"{KERNEL_NAME}_{arch}.ptx"
        cmd = [nvcc, "--ptx", f"-arch={arch}", "-O3", "-std=c++17", f"-I{PLUGIN_DIR}", str(CUDA_SOURCE), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not out.is_file():
            raise UserError(
                f"nvcc could not compile {CUDA_SOURCE.name} for {arch}: {_first_error(result.stderr + result.stdout)}",
                f"fix the CUDA source; reproduce with: {' '.join(cmd)}",
            )
        return out.read_text()


def compile_ptx_nvrtc(arch: str) -> str:
    """The same PTX through NVRTC (cuda-python's ``cuda.bindings.nvrtc``); the core header builds
    without C headers under ``__CUDACC_RTC__``."""
    try:
        from cuda.bindings import nvrtc  # noqa: PLC0415 - optional (the gpu extra)
    except ImportError as exc:
        raise UserError(
            "neither nvcc nor NVRTC is available to compile the BinaryConv2d kernel",
            "install the CUDA toolkit (nvcc) or cuda-python (pip install 'tod-deploy[gpu]')",
        ) from exc

    def check(result: tuple, what: str) -> tuple:
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise UserError(f"NVRTC failed to {what} ({result[0]})", "check the CUDA installation (libnvrtc)")
        return result[1:]

    (program,) = check(nvrtc.nvrtcCreateProgram(CUDA_SOURCE.read_bytes(), CUDA_SOURCE.name.encode(), 0, [], []),
                       "create a program")  # fmt: skip
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", f"--include-path={PLUGIN_DIR}".encode(),
               f"--include-path={CUDA_DIR}".encode()]  # fmt: skip
    (status,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        (size,) = check(nvrtc.nvrtcGetProgramLogSize(program), "read its log")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(program, log)
        raise UserError(
            f"NVRTC could not compile {CUDA_SOURCE.name} for {arch}: {_first_error(log.decode(errors='replace'))}",
            "fix the CUDA source",
        )
    (size,) = check(nvrtc.nvrtcGetPTXSize(program), "size the PTX")
    ptx = b" " * size
    check((nvrtc.nvrtcGetPTX(program, ptx)[0], None), "read the PTX")
    nvrtc.nvrtcDestroyProgram(program)
    return ptx.rstrip(b"\0").decode()


def compile_ptx(arch: str) -> str:
    """PTX of the kernel for ``arch`` (``sm_87`` or ``compute_87``), as TensorRT's AOT plugin takes it."""
    return _compile(_compute_arch(arch), _source_digest())
