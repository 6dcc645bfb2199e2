"""The CUDA kernel of tod::BinaryConv2d without a GPU: its PTX builds, its arithmetic on the host, its launch.

No GPU runs here, so the kernel is checked in three ways that can run anywhere:

* nvcc builds PTX for every target arch, with one entry point of the signature TensorRT's AOT
  launcher calls and the tensor-core instruction each arch is meant to use;
* a host harness (plugins/binary_conv2d/cuda/host_check.cpp) runs the kernel's own TOD_HD steps
  block by block, with the warp MMA emulated from the PTX ISA's fragment tables, and must match
  the NumPy reference bit for bit on the integer sums, on the cases the CPU kernel is tested over,
  and on Y through the fused epilogue (residual, relu / prelu) with the inputs ``doctor --gpu`` uses;
* the launch arithmetic agrees with ``BinaryConvAttrs`` on ints and uses only what TensorRT's
  symbolic shape expressions support.

The grid (``tod_deploy/ops/binary_conv_cases.py``) is the one ``tod-deploy doctor --gpu`` runs the
compiled kernel over on a real GPU (tests/test_doctor.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_binary_conv import assert_scaled_close, reference

from tod_deploy.errors import UserError
from tod_deploy.ops.binary_conv_cases import (
    CUDA_CASES,
    EDGE_CASE,
    SIGNS,
    Geometry,
    case_id,
    edge_case_inputs,
    epilogue_inputs,
    make_inputs,
    sign_pairs,
)
from tod_deploy.ops.binary_conv_ref import ACTIVATIONS, BinaryConvAttrs, binary_conv2d_ref, pack_weights
from tod_deploy.trt import kernels

PATHS = {"and_m16n8k256": 0, "xor_m8n8k128": 1}
MMA = {
    "and": "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc",
    "xor": "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.xor.popc",
}
TILE_HEADER = kernels.CUDA_DIR / "binary_conv2d_tile.cuh"
HOST_CHECK = kernels.CUDA_DIR / "host_check.cpp"


# --- PTX builds ---------------------------------------------------------------------------------


def require_nvcc() -> None:
    """Skip without nvcc, except in CI, where the CUDA source must compile."""
    if kernels.find_nvcc() is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is not on PATH and CI is set: CI must build the CUDA kernel's PTX")
        pytest.skip("nvcc is not on PATH (CUDA toolkit not installed)")


def entry_params(ptx: str) -> list[str]:
    match = re.search(rf"\.visible \.entry {kernels.KERNEL_NAME}\((.*?)\)", ptx, re.S)
    assert match, f".entry {kernels.KERNEL_NAME} is missing from the PTX"
    return re.findall(r"\.param \.(\w+) ", match.group(1))


@pytest.mark.parametrize("arch", kernels.TARGET_ARCHS)
def test_ptx_builds_with_the_aot_signature_and_the_arch_mma(arch: str) -> None:
    require_nvcc()
    ptx = kernels.compile_ptx(arch)
    assert re.search(rf"^\.target {arch}\b", ptx, re.M), f"PTX is not for {arch}"
    pointers, ints = len(kernels.KERNEL_INPUTS), len(kernels.KERNEL_INT_ARGS)
    outputs = len(kernels.KERNEL_OUTPUTS)
    assert entry_params(ptx) == ["u64"] * pointers + ["u32"] * ints + ["u64"] * outputs
    want, other = ("xor", "and") if arch == "sm_75" else ("and", "xor")
    assert MMA[want] in ptx and MMA[other] not in ptx
    # the epilogue rounds twice: round-to-nearest mul and add, never a fused multiply-add
    assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx and "fma.rn.f32" not in ptx


@pytest.mark.parametrize("arch", kernels.TARGET_ARCHS)
def test_ptx_assembles_for_its_gpu(arch: str, tmp_path: Path) -> None:
    """ptxas does what the driver's JIT will do on the GPU: nvcc --ptx does not check inline PTX."""
    require_nvcc()
    ptxas = Path(kernels.find_nvcc()).with_name("ptxas")
    if not ptxas.is_file():
        pytest.skip(f"no ptxas next to nvcc ({ptxas})")
    source = tmp_path / f"{arch}.ptx"
    source.write_text(kernels.compile_ptx(arch))
    cmd = [str(ptxas), f"-arch={arch}", "-v", str(source), "-o", str(tmp_path / f"{arch}.cubin")]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"ptxas rejects the {arch} PTX:\n{result.stderr}"
    smem = re.search(r"(\d+) bytes smem", result.stderr)
    assert smem and int(smem.group(1)) <= 48 * 1024, "static shared memory over 48 KiB needs an opt-in"
    assert "0 bytes spill stores" in result.stderr, result.stderr


def test_compile_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unsupported CUDA arch 'sm_70'"):
        kernels.compile_ptx("sm_70")
    monkeypatch.setattr(kernels, "find_nvcc", lambda: None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # and no NVRTC either
    kernels._compile.cache_clear()
    with pytest.raises(UserError, match="neither nvcc nor NVRTC.*install the CUDA toolkit"):
        kernels.compile_ptx("sm_87")
    monkeypatch.undo()
    kernels._compile.cache_clear()
    require_nvcc()
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" __global__ void tod_binary_conv2d() { undeclared_name(); }\n')
    monkeypatch.setattr(kernels, "CUDA_SOURCE", broken)
    monkeypatch.setattr(kernels, "CUDA_DEPENDENCIES", (broken,))
    with pytest.raises(UserError, match="could not compile broken.cu for compute_87: .*error.*undeclared_name"):
        kernels.compile_ptx("sm_87")
    monkeypatch.setattr(kernels, "CUDA_DEPENDENCIES", (tmp_path / "gone.cu",))
    with pytest.raises(UserError, match="CUDA sources are missing"):
        kernels.compile_ptx("sm_87")


def test_python_constants_mirror_the_tile_header() -> None:
    text = TILE_HEADER.read_text()

    def constant(name: str) -> int:
        match = re.search(rf"constexpr int {name} = (\d+);", text)
        assert match, f"{name} not found in {TILE_HEADER.name}"
        return int(match.group(1))

    assert (constant("kThreads"), constant("kBM"), constant("kBN")) == (
        kernels.THREADS,
        kernels.BLOCK_M,
        kernels.BLOCK_N,
    )
    enum = re.search(r"enum ArgIndex \{(.*?)\};", text, re.S)
    assert enum, "ArgIndex enum not found"
    names = [name.strip() for name in enum.group(1).split(",") if name.strip()]
    assert names[-1] == "kArgCount" and len(names) - 1 == len(kernels.KERNEL_INT_ARGS)
    assert names[-3:-1] == ["kActivation", "kHasResidual"] == ["k" + "".join(map(str.title, n.split("_")))
                                                                 for n in kernels.KERNEL_INT_ARGS[-2:]]  # fmt: skip
    core = (kernels.PLUGIN_DIR / "binary_conv2d_core.h").read_text()
    codes = re.search(r"enum Activation \{(.*?)\};", core, re.S)
    assert codes, "enum Activation not found in binary_conv2d_core.h"
    assert [tuple(item.split("=")) for item in codes.group(1).replace(" ", "").split(",")] == [
        (f"kAct{name.title()}", str(code)) for code, name in enumerate(ACTIVATIONS)
    ]


# --- host arithmetic ----------------------------------------------------------------------------


def host_compiler() -> str | None:
    return next((found for name in ("g++", "c++", "clang++") if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    compiler = host_compiler()
    if compiler is None:
        pytest.skip("no host C++ compiler (g++, c++, clang++) to build the kernel's host harness")
    lib = tmp_path_factory.mktemp("host_check") / "host_check.so"
    cmd = [compiler, "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC"]
    cmd += [f"-I{kernels.PLUGIN_DIR}", str(HOST_CHECK), "-o", str(lib)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"host harness does not compile:\n{result.stderr}"
    dll = ctypes.CDLL(str(lib))
    ptr = np.ctypeslib.ndpointer
    f32, u8, i32, u64 = (ptr(t, flags="C_CONTIGUOUS") for t in (np.float32, np.uint8, np.int32, np.uint64))
    i, optional = ctypes.c_int32, ctypes.c_void_p  # residual and slope: null when absent, as the kernel may get
    dll.tod_emulate_kernel.argtypes = [f32, u8, f32, f32, optional, optional, i32, ctypes.c_int, i, i, i, f32, i32]
    dll.tod_emulate_kernel.restype = ctypes.c_int
    dll.tod_direct_sums.argtypes = [f32, u8, i32, i32]
    dll.tod_direct_sums.restype = None
    dll.tod_sum_and_words.argtypes = [u64, u64, u64, i]
    dll.tod_sum_and_words.restype = i
    dll.tod_sum_xor_words.argtypes = [u64, u64, u64, u64, i]
    dll.tod_sum_xor_words.restype = i
    dll.tod_kernel_arg_count.restype = i
    return dll


def emulate(
    dll: ctypes.CDLL,
    x: np.ndarray,
    packed: np.ndarray,
    alpha: np.ndarray,
    bias: np.ndarray,
    attrs: BinaryConvAttrs,
    path: int,
    *,
    residual: np.ndarray | None = None,
    slope: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the kernel's block steps over the grid launch_geometry gives; unwritten outputs stay NaN / INT32_MIN.

    An absent residual or slope reaches the kernel as a null pointer: reading it would crash the harness.
    """
    cout = packed.shape[0]
    launch = kernels.launch_geometry(x.shape, cout, attrs)
    args = kernels.kernel_int_args(x.shape, cout, attrs, has_residual=residual is not None)
    oh, ow = attrs.output_size(*x.shape[2:])
    y = np.full((x.shape[0], cout, oh, ow), np.nan, dtype=np.float32)
    sums = np.full(y.shape, np.iinfo(np.int32).min, dtype=np.int32)
    pointers = [None if a is None else np.ascontiguousarray(a, dtype=np.float32) for a in (residual, slope)]
    rc = dll.tod_emulate_kernel(np.ascontiguousarray(x), packed, alpha, bias,
                                *(None if a is None else a.ctypes.data for a in pointers),
                                np.array(args, dtype=np.int32), path, *launch.grid, y, sums)  # fmt: skip
    assert rc == 0, "the emulated MMA fragment table does not cover A/B exactly once"
    return sums, y


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("geo", CUDA_CASES, ids=case_id)
def test_kernel_steps_match_reference(harness: ctypes.CDLL, geo: Geometry, path: int) -> None:
    x, w, alpha, bias = make_inputs(geo)
    for zero_sign, pad_value in sign_pairs():
        attrs = geo.attrs(zero_sign, pad_value)
        want_sums, want_out = reference(geo, zero_sign, pad_value)
        sums, out = emulate(harness, x, pack_weights(w, zero_sign), alpha, bias, attrs, path)
        assert np.array_equal(sums, want_sums), f"sums differ for zero_sign={zero_sign} pad_value={pad_value}"
        assert_scaled_close(out, want_out)


@pytest.mark.parametrize("geo", CUDA_CASES, ids=case_id)
def test_direct_packed_sums_match_reference(harness: ctypes.CDLL, geo: Geometry) -> None:
    """S = popc(n) - 2 popc((s ^ w) & n) on the kernel's packed words, without tiles or MMAs."""
    x, w, _, _ = make_inputs(geo)
    for zero_sign, pad_value in sign_pairs():
        attrs = geo.attrs(zero_sign, pad_value)
        want_sums, _ = reference(geo, zero_sign, pad_value)
        sums = np.full(want_sums.shape, np.iinfo(np.int32).min, dtype=np.int32)
        args = np.array(kernels.kernel_int_args(x.shape, geo.cout, attrs, has_residual=False), dtype=np.int32)
        harness.tod_direct_sums(x, pack_weights(w, zero_sign), args, sums)
        assert np.array_equal(sums, want_sums), f"sums differ for zero_sign={zero_sign} pad_value={pad_value}"


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_kernel_steps_nan_threshold_ties_and_zero_bias(harness: ctypes.CDLL, path: int) -> None:
    x, w, alpha, zeros = edge_case_inputs()  # NaNs, values exactly on the threshold, zero bias
    for zero_sign in SIGNS:
        attrs = EDGE_CASE.attrs(zero_sign, pad_value=0)
        want_sums, want_out = binary_conv2d_ref(x, w, alpha, None, attrs)
        sums, out = emulate(harness, x, pack_weights(w, zero_sign), alpha, zeros, attrs, path)
        assert np.array_equal(sums, want_sums)
        assert_scaled_close(out, want_out)


# The epilogue's host check: three geometries (odd channels and stride 2, 17 per group, two channel tiles per
# group), each with one of the sign pairs, every activation with and without a residual.
EPILOGUE_GEOMETRIES = (CUDA_CASES[1], CUDA_CASES[6], CUDA_CASES[-2])


def bits_equal(got: np.ndarray, want: np.ndarray) -> bool:
    """Float32 bit patterns equal (so -0.0 != 0.0), any NaN equal to any NaN."""
    nan = np.isnan(want)
    return bool(np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan].view(np.uint32),
                                                                        want[~nan].view(np.uint32)))  # fmt: skip


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("geo", EPILOGUE_GEOMETRIES, ids=case_id)
def test_kernel_epilogue_matches_reference(harness: ctypes.CDLL, geo: Geometry, path: int) -> None:
    """Y = act(alpha * S + bias + residual) bit for bit, each step rounded; absent inputs never read."""
    zero_sign, pad_value = sign_pairs()[EPILOGUE_GEOMETRIES.index(geo) * 4]
    x, w, alpha, bias = make_inputs(geo)
    plain = geo.attrs(zero_sign, pad_value)
    _, base = binary_conv2d_ref(x, w, alpha, bias, plain)
    packed = pack_weights(w, zero_sign)
    for activation, with_residual in itertools.product(ACTIVATIONS, (False, True)):
        attrs = dataclasses.replace(plain, activation=activation)
        residual, slope = epilogue_inputs(base, activation)  # the inputs doctor --gpu gives the kernel too
        if with_residual:
            residual[1, :2, 0, 0] = (np.nan, -np.inf)  # NaN passes both activations; -inf off slope[0] = 0
        else:
            residual = None
        _, want = binary_conv2d_ref(x, w, alpha, bias, attrs, residual=residual, slope=slope)
        if with_residual:
            assert (base + residual == 0).any() and (base + residual < 0).any(), "the inputs miss 0 or negatives"
        if activation == "prelu":
            assert (slope < 0).any() and (want < 0).any()
        _, got = emulate(harness, x, packed, alpha, bias, attrs, path, residual=residual, slope=slope)
        assert bits_equal(got, want), f"Y differs for activation={activation} residual={with_residual}"


def random_planes(rng: np.random.Generator, words: int) -> tuple[np.ndarray, ...]:
    """Random sign / nonzero / valid / weight words with s implies n implies valid and w inside valid."""
    bits = lambda: rng.integers(0, 2**64, size=words, dtype=np.uint64)  # noqa: E731
    lengths = rng.integers(0, 65, size=words)
    valid = np.array([(1 << int(n)) - 1 for n in lengths], dtype=np.uint64)
    nonzero = bits() & valid
    return bits() & nonzero, nonzero, valid, bits() & valid


def bit_values(word_array: np.ndarray) -> np.ndarray:
    return np.unpackbits(word_array.astype("<u8").view(np.uint8), bitorder="little").astype(np.int64)


def test_sum_identities_on_random_words(harness: ctypes.CDLL) -> None:
    """The AND and XOR identities equal sum(xb * wb) over valid bits, xb in {-1, 0, +1}, wb in {-1, +1}."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        sign, nonzero, valid, w = random_planes(rng, int(rng.integers(1, 6)))
        s, n, v, wb = (bit_values(a) for a in (sign, nonzero, valid, w))
        want = int(((2 * s - n) * (2 * wb - 1) * v).sum())
        got_and = harness.tod_sum_and_words(sign, nonzero, w, len(w))
        got_xor = harness.tod_sum_xor_words(sign, nonzero, valid, w, len(w))
        assert (got_and, got_xor) == (want, want), f"trial {trial}"


# --- launch arithmetic --------------------------------------------------------------------------


class Sym:
    """A stand-in for TensorRT's symbolic shape expressions: only +, -, * and cdiv, nothing else."""

    def __init__(self, value: int) -> None:
        self.value = value

    @staticmethod
    def of(other: Sym | int) -> int:
        return other.value if isinstance(other, Sym) else other

    def __add__(self, other: Sym | int) -> Sym:
        return Sym(self.value + Sym.of(other))

    def __sub__(self, other: Sym | int) -> Sym:
        return Sym(self.value - Sym.of(other))

    def __mul__(self, other: Sym | int) -> Sym:
        return Sym(self.value * Sym.of(other))

    __radd__ = __add__
    __rmul__ = __mul__


def sym_cdiv(a: Sym | int, b: Sym | int) -> Sym:
    return Sym(-(-Sym.of(a) // Sym.of(b)))


@pytest.mark.parametrize("geo", CUDA_CASES, ids=case_id)
def test_launch_arithmetic_matches_attrs(harness: ctypes.CDLL, geo: Geometry) -> None:
    assert harness.tod_kernel_arg_count() == len(kernels.KERNEL_INT_ARGS)
    for (zero_sign, pad_value), n in itertools.product(sign_pairs(), (1, 3)):
        attrs = geo.attrs(zero_sign, pad_value)
        shape = (n, geo.c, geo.h, geo.w)
        oh, ow = attrs.output_size(geo.h, geo.w)
        assert kernels.output_hw(geo.h, geo.w, attrs) == (oh, ow)
        int_args = kernels.kernel_int_args(shape, geo.cout, attrs, has_residual=False)
        args = dict(zip(kernels.KERNEL_INT_ARGS, int_args, strict=True))
        assert args == {
            "n": n,
            "c": geo.c,
            "h": geo.h,
            "w": geo.w,
            "out_channels": geo.cout,
            "out_h": oh,
            "out_w": ow,
            "kernel_h": attrs.kernel_shape[0],
            "kernel_w": attrs.kernel_shape[1],
            "stride_h": attrs.strides[0],
            "stride_w": attrs.strides[1],
            "pad_top": attrs.pads[0],
            "pad_left": attrs.pads[1],
            "dilation_h": attrs.dilations[0],
            "dilation_w": attrs.dilations[1],
            "group": attrs.group,
            "zero_sign": zero_sign,
            "pad_value": pad_value,
            "threshold_bits": int(np.float32(geo.threshold).view(np.int32)),
            "activation": 0,
            "has_residual": 0,
        }
        launch = kernels.launch_geometry(shape, geo.cout, attrs)
        gx, gy, gz = launch.grid
        tiles_per_group = -(-geo.cout // geo.group // kernels.BLOCK_N)
        assert (gx - 1) * kernels.BLOCK_M < oh * ow <= gx * kernels.BLOCK_M
        assert (gy, gz) == (geo.group * tiles_per_group, n)
        assert launch.block == (kernels.THREADS, 1, 1) and launch.shared_mem == 0
        symbolic = kernels.launch_geometry(tuple(Sym(d) for d in shape), geo.cout, attrs, cdiv=sym_cdiv)
        assert [Sym.of(d) for d in symbolic.grid] == [gx, gy, gz]
        sym_args = kernels.kernel_int_args(tuple(Sym(d) for d in shape), geo.cout, attrs, cdiv=sym_cdiv,
                                           has_residual=False)  # fmt: skip
        assert [Sym.of(a) for a in sym_args] == list(args.values())
    for code, activation in enumerate(ACTIVATIONS):  # the enum Activation of binary_conv2d_core.h
        attrs = dataclasses.replace(geo.attrs(-1, 0), activation=activation)
        for has_residual in (False, True):
            args = dict(zip(kernels.KERNEL_INT_ARGS, kernels.kernel_int_args(
                (1, geo.c, geo.h, geo.w), geo.cout, attrs, has_residual=has_residual), strict=True))  # fmt: skip
            assert (args["activation"], args["has_residual"]) == (code, int(has_residual))


def test_output_hw_and_out_channels_errors() -> None:
    attrs = BinaryConvAttrs(kernel_shape=(5, 5), in_channels=4, group=2)
    with pytest.raises(UserError, match="does not fit a 3x3 input"):
        kernels.output_hw(3, 3, attrs)
    with pytest.raises(UserError, match="out_channels=5 .* divisible by group=2"):
        kernels.launch_geometry((1, 4, 8, 8), 5, attrs)


@pytest.mark.parametrize("value", [0.0, -0.0, 0.25, -0.5, 1e-40, -3.4e38, 0.1])
def test_threshold_bits_round_trip(value: float) -> None:
    bits = kernels.float_bits(value)
    assert -(2**31) <= bits < 2**31
    decoded = np.array([bits], dtype=np.int32).view(np.float32)[0]
    assert decoded.tobytes() == np.float32(value).tobytes()


@pytest.mark.parametrize("arch", ["sm_75", "sm_87"])
def test_nvrtc_builds_the_same_kernel(arch: str, tmp_path: Path) -> None:
    """GPU machines often have TensorRT and cuda-python but no nvcc: NVRTC must build the same kernel."""
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (NVRTC bindings) is not installed")
    try:
        ptx = kernels.compile_ptx_nvrtc(kernels._compute_arch(arch))
    except UserError as exc:  # the bindings without libnvrtc
        pytest.skip(f"NVRTC is not usable here: {exc}")
    assert re.search(rf"^\.target {arch}\b", ptx, re.M)
    pointers, ints = len(kernels.KERNEL_INPUTS), len(kernels.KERNEL_INT_ARGS)
    assert entry_params(ptx) == ["u64"] * pointers + ["u32"] * ints + ["u64"] * len(kernels.KERNEL_OUTPUTS)
    want, other = ("xor", "and") if arch == "sm_75" else ("and", "xor")
    assert MMA[want] in ptx and MMA[other] not in ptx and "fma.rn.f32" not in ptx
    ptxas = Path(kernels.find_nvcc() or "/nonexistent").with_name("ptxas")
    if ptxas.is_file():
        (tmp_path / "k.ptx").write_text(ptx)
        result = subprocess.run([str(ptxas), f"-arch={arch}", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
