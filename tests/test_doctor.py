"""``tod-deploy doctor`` and ``doctor --gpu``: the machine report as a user runs it, and the GPU self-test's
decisions (configurations, kernel parameters, comparison, report) without a GPU.

The self-test's driver calls run only on a GPU machine: ``test_doctor_gpu_on_a_real_gpu`` runs the
real command there and skips elsewhere. Everything it decides is checked here against the same
definitions the TensorRT plugin and the kernel use (``kernels``, ``plugins``, the PTX entry).
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openvino
import pytest
from rich.console import Console
from test_cli import assert_one_line_error, run
from test_cuda_kernel import entry_params, require_nvcc

from tod_deploy import doctor
from tod_deploy.errors import UserError
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.ops.binary_conv_cases import (
    CUDA_CASES,
    EDGE_CASE,
    RESNET18_STAGES,
    edge_case_inputs,
    make_inputs,
    sign_pairs,
)
from tod_deploy.ops.binary_conv_ref import (
    ACTIVATIONS,
    BinaryConvAttrs,
    binary_conv2d_ref,
    pack_weights,
    unpack_weights,
)
from tod_deploy.trt import gpu_selftest, kernels
from tod_deploy.trt.cuda_driver import CudaError, GpuDevice, GpuProbe, call, cuda_version_text, parse_nvidia_smi

TENSORRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


def gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


# --- doctor, as a subprocess --------------------------------------------------------------------


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict]:
    path = tmp_path_factory.mktemp("doctor") / "doctor.json"
    proc = run("doctor", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(path.read_text())


def test_doctor_prints_the_tables(machine: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    proc, _ = machine
    for needle in ("this machine", "1-bit CPU kernel", "onnxruntime", "TensorRT", "bench backends"):
        assert needle in proc.stdout
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr


def test_doctor_json_has_this_machines_values(machine: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    import onnxruntime
    import torch

    _, report = machine
    cpu = report["cpu"]
    assert cpu["kernel_path"] == binary_conv_cpu.current_isa() and cpu["model"]
    assert cpu["kernel_path"] in binary_conv_cpu.supported_isas() == tuple(cpu["kernel_paths"])
    if Path("/proc/cpuinfo").is_file():
        assert list(cpu["flags"]) == list(doctor.KERNEL_FLAGS)
        assert cpu["flags"]["avx512_vpopcntdq"] == ("avx512" in binary_conv_cpu.supported_isas())
        if "amx" in binary_conv_cpu.supported_isas():  # the flags, and a kernel that grants the tile state
            assert cpu["flags"]["amx_tile"] and cpu["flags"]["amx_int8"]
    assert report["onnxruntime"]["version"] == onnxruntime.__version__
    assert report["onnxruntime_providers"] == onnxruntime.get_available_providers()
    assert report["onnxruntime_extensions"]["version"] == importlib.metadata.version("onnxruntime-extensions")
    assert report["torch"]["version"] == importlib.metadata.version("torch")
    assert report["torch_cuda_build"] == torch.version.cuda
    assert report["torch_cuda_available"] == torch.cuda.is_available()
    assert (report["nvcc"]["version"] is not None) == (kernels.find_nvcc() is not None)
    assert report["tritonserver"]["version"] == f"nvidia-pytriton {importlib.metadata.version('nvidia-pytriton')}"
    assert "backends: python" in report["tritonserver"]["detail"]  # the serve extra's bundle
    backends = report["bench_backends"]
    assert list(backends) == ["torch", "onnxruntime", "openvino", "tensorrt"]
    assert backends["torch"]["usable"] and backends["onnxruntime"]["usable"] and backends["openvino"]["usable"]
    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")  # the test extra brings it
    assert report["openvino"]["version"] == openvino.__version__.split("-")[0]
    assert f"auto runs {'bf16' if 'BF16' in capabilities else 'fp32'}" in report["openvino"]["detail"]
    assert backends["onnxruntime"]["runs_on"].startswith("CPUExecutionProvider")
    if not TENSORRT_INSTALLED:
        assert report["tensorrt"]["version"] is None and report["tensorrt"]["problem"] == "not installed"
        assert report["tensorrt"]["install"] == doctor.GPU_INSTALL
        assert not backends["tensorrt"]["usable"] and "pip install 'tod-deploy[gpu]'" in backends["tensorrt"]["install"]
    if not report["gpu"]["devices"]:
        assert report["gpu"]["problem"] and not report["torch_cuda_available"]
        assert "no NVIDIA GPU is visible" in backends["tensorrt"]["reason"]


def test_doctor_without_a_gpu_imports_neither_torch_nor_onnxruntime_extensions() -> None:
    """What keeps doctor quick (each import costs about 1.5 s); with a GPU, torch is asked about torch.cuda."""
    code = (
        "import sys; from tod_deploy.doctor import doctor_report; r = doctor_report(); "
        "print(bool(r.gpu.devices), 'torch' in sys.modules, 'onnxruntime_extensions' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    has_gpu, torch_imported, extensions_imported = proc.stdout.split()
    if has_gpu == "True":
        pytest.skip("a GPU is visible: doctor asks torch itself whether torch.cuda works")
    assert (torch_imported, extensions_imported) == ("False", "False")


def test_doctor_gpu_without_a_gpu_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    if gpu_visible():
        pytest.skip("a GPU is visible here (test_doctor_gpu_on_a_real_gpu runs the self-test)")
    proc = run("doctor", "--gpu", cwd=tmp_path)
    assert_one_line_error(proc, "no NVIDIA GPU is visible (", "nvidia-smi")
    report, machine = tmp_path / "gpu.json", tmp_path / "d.json"
    proc = run("doctor", "--gpu", "--gpu-report", str(report), "--json", str(machine), cwd=tmp_path)
    assert_one_line_error(proc, "no NVIDIA GPU is visible (")
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_doctor_gpu_on_a_real_gpu(tmp_path: Path) -> None:
    if not gpu_visible():
        pytest.skip("needs an NVIDIA GPU")
    report_path = tmp_path / "gpu.json"
    proc = run("doctor", "--gpu", "--gpu-report", str(report_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    cases = gpu_selftest.kernel_cases()
    assert report["ok"] and report["bit_exact"]["passed"] == report["bit_exact"]["total"] == len(cases)
    assert [config["name"] for config in report["configs"]] == [case.name for case in cases]
    assert all(config["ok"] and config["mismatch"] is None for config in report["configs"])
    assert [stage["input"][1:3] for stage in report["stages"]] == [[c, s] for c, s in RESNET18_STAGES]
    assert all(stage["ok"] and stage["median_ms"]["kernel"] > 0 for stage in report["stages"])
    assert "GPU self-test passed" in proc.stdout


# --- probes -------------------------------------------------------------------------------------

INTEL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz
flags\t\t: fpu sse2 popcnt avx avx2 bmi2

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: other
"""


def test_cpu_fields_come_from_the_first_processor(tmp_path: Path) -> None:
    fields = doctor.parse_cpuinfo(INTEL_CPUINFO)
    assert fields["vendor_id"] == "GenuineIntel" and fields["model name"].startswith("Intel(R) Xeon(R) Gold")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(INTEL_CPUINFO)
    cpu = doctor.probe_cpu(cpuinfo)
    assert cpu.vendor == "Intel"
    assert cpu.flags == {flag: flag in ("avx2", "popcnt") for flag in doctor.KERNEL_FLAGS}
    assert cpu.kernel_path == binary_conv_cpu.current_isa()  # what the compiled kernel says, not the file
    assert doctor.probe_cpu(tmp_path / "missing").flags == {}


def test_torch_cuda_build_is_read_without_importing_torch() -> None:
    import torch

    assert doctor.torch_cuda_build() == torch.version.cuda


def test_broken_tensorrt_install_is_reported_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if TENSORRT_INSTALLED:
        pytest.skip("TensorRT is installed here; the stand-in would shadow it")
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('libnvinfer.so.11: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = doctor.probe_tensorrt()
    assert not found.ok and found.version is None
    assert found.problem == "installed but fails to import (OSError: libnvinfer.so.11: cannot open shared object file)"
    assert "--force-reinstall 'tensorrt>=11'" in found.install
    assert "tensorrt" not in sys.modules


H200 = GpuDevice(0, "NVIDIA H200", (9, 0), 141 * 2**30)


@pytest.mark.parametrize(
    ("gpu", "tensorrt", "cuda_python", "usable", "needle"),
    [
        (GpuProbe(problem="no driver"), doctor.Component("TensorRT", "11.0"), doctor.Component("cuda-python", "13"),
         False, "no NVIDIA GPU is visible (no driver)"),
        (GpuProbe((H200,)), doctor.Component("TensorRT", problem="not installed", install=doctor.GPU_INSTALL),
         doctor.Component("cuda-python", "13"), False, "TensorRT is not installed"),
        (GpuProbe((H200,)), doctor.Component("TensorRT", "11.0"), doctor.Component("cuda-python", problem="not "
         "installed", install=doctor.GPU_INSTALL), False, "cuda-python is not installed"),
        (GpuProbe((H200,)), doctor.Component("TensorRT", "11.0"), doctor.Component("cuda-python", "13"), True, ""),
    ],
)  # fmt: skip
def test_tensorrt_backend_names_the_first_missing_piece(
    gpu: GpuProbe, tensorrt: doctor.Component, cuda_python: doctor.Component, usable: bool, needle: str
) -> None:
    backend = doctor.tensorrt_backend(tensorrt=tensorrt, cuda_python=cuda_python, gpu=gpu)
    assert backend.usable == usable and needle in backend.reason
    if usable:
        assert backend.runs_on == "NVIDIA H200 (TensorRT 11.0)"
    else:
        assert backend.install == doctor.GPU_INSTALL


def test_driver_helpers() -> None:
    driver = pytest.importorskip("cuda.bindings.driver", reason="cuda-python is not installed")

    assert call((driver.CUresult.CUDA_SUCCESS, 7), "x") == 7 and call((driver.CUresult.CUDA_SUCCESS,), "x") is None
    with pytest.raises(CudaError, match="cuModuleLoadData failed with CUDA_ERROR_UNSUPPORTED_PTX_VERSION") as info:
        call((driver.CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION, None), "cuModuleLoadData")
    assert info.value.name == gpu_selftest.PTX_TOO_NEW
    assert (cuda_version_text(13000), cuda_version_text(12080)) == ("13.0", "12.8")
    smi = "0, NVIDIA H200, 9.0, 143771, 580.65.06\n1, NVIDIA H200, 9.0, 143771, 580.65.06\nNo devices were found\n"
    devices, release = parse_nvidia_smi(smi)
    assert release == "580.65.06" and [d.index for d in devices] == [0, 1]
    assert devices[0] == GpuDevice(0, "NVIDIA H200", (9, 0), 143771 * 2**20)


def test_require_gpu() -> None:
    with pytest.raises(UserError, match=r"no NVIDIA GPU is visible \(no driver\); run doctor --gpu on a machine"):
        gpu_selftest.require_gpu(GpuProbe(problem="no driver"))
    assert gpu_selftest.require_gpu(GpuProbe((H200,))) == H200


# --- the self-test's decisions ------------------------------------------------------------------


GRID = len(CUDA_CASES) * len(sign_pairs())  # the plain grid's cases come first, then 3 edge cases
FIRST_EPILOGUE = GRID + 3


def test_kernel_cases_walk_the_shared_grid() -> None:
    cases = gpu_selftest.kernel_cases()
    assert len({case.name for case in cases}) == len(cases)
    plain = [case for case in cases if case.activation == "none" and not case.residual]
    assert len(plain) == GRID + 3 and plain == cases[:FIRST_EPILOGUE]
    grid = [(case.geometry, case.zero_sign, case.pad_value) for case in plain if not case.edge]
    assert grid == [(geo, z, p) for geo in CUDA_CASES for z, p in sign_pairs()]
    assert all(case.geometry == EDGE_CASE for case in cases if case.edge)
    epilogue = cases[FIRST_EPILOGUE:]
    assert {(case.activation, case.residual) for case in epilogue} == {(a, True) for a in ACTIVATIONS} | {
        ("relu", False), ("prelu", False)}  # fmt: skip
    assert len({case.geometry for case in epilogue}) >= 2 and all(case.geometry in CUDA_CASES for case in epilogue)
    assert "prelu+residual" in epilogue[2].name


# plain, threshold 0.5, the 256-channel tile, the edge case, prelu+residual, prelu with two channel tiles per group
@pytest.mark.parametrize("index", [0, 13, 95, 99, FIRST_EPILOGUE + 2, FIRST_EPILOGUE + 9])
def test_case_data_is_what_tensorrt_hands_the_kernel(index: int) -> None:
    case = gpu_selftest.kernel_cases()[index]
    data = gpu_selftest.case_data(case)
    assert data.w_words.dtype == np.dtype("<i4") and data.x.dtype == np.float32
    x, w, alpha, bias = edge_case_inputs() if case.edge else make_inputs(case.geometry)
    assert data.w_words.tobytes() == pack_weights(w, case.zero_sign).tobytes()
    assert data.attrs.activation == case.activation and data.has_residual == case.residual
    assert data.residual.dtype == data.slope.dtype == np.float32
    assert data.residual.shape == (data.out_shape if case.residual else (0,))
    assert data.slope.shape == ((data.out_channels,) if case.activation == "prelu" else (0,))
    residual, slope = (a if a.size else None for a in (data.residual, data.slope))
    _, want = binary_conv2d_ref(x, w, alpha, bias, data.attrs, residual=residual, slope=slope)
    assert gpu_selftest.first_mismatch(data.expected, want) is None and data.out_shape == want.shape
    if case.residual:  # Y + residual lands exactly on 0 and below it
        _, plain = binary_conv2d_ref(x, w, alpha, bias, dataclasses.replace(data.attrs, activation="none"))
        assert (plain + data.residual == 0).any() and (plain + data.residual < 0).any()
    if case.activation == "prelu":
        assert (data.slope < 0).any() and (data.expected < 0).any()
    if case.geometry.ties:  # zeros and values exactly on the threshold are in every tie grid
        assert (x == 0).any() and (x == np.float32(case.geometry.threshold)).any()
    if case.edge:
        assert np.isnan(x).any() and not bias.any()


def test_stage_data_expected_equals_the_reference() -> None:
    """At stage shapes Y comes from the CPU kernel's sums; on a small stage it must equal the reference's Y."""
    data = gpu_selftest.stage_data(64, 7)
    assert data.attrs == BinaryConvAttrs(kernel_shape=(3, 3), in_channels=64, pads=(1, 1, 1, 1))
    weights = unpack_weights(data.w_words.view(np.uint8), 64)
    _, want = binary_conv2d_ref(data.x, weights, data.alpha, data.bias, data.attrs)
    assert data.expected_from.startswith("CPU kernel") and gpu_selftest.first_mismatch(data.expected, want) is None
    assert [gpu_selftest.im2col_gemm_shape(c, s, c) for c, s in RESNET18_STAGES] == [
        (40000, 576, 64), (10000, 1152, 128), (2500, 2304, 256), (625, 4608, 512)
    ]  # fmt: skip


@pytest.mark.parametrize("index", [13, FIRST_EPILOGUE + 2])
def test_kernel_params_follow_the_ptx_entry_and_kernel_int_args(index: int) -> None:
    """6 input pointers (.u64), the 21 int32 of KERNEL_INT_ARGS (.u32), the output pointer (.u64), in order."""
    require_nvcc()
    case = gpu_selftest.kernel_cases()[index]
    data = gpu_selftest.case_data(case)
    call_ = gpu_selftest.plan_call(data.x.shape, data.out_channels, data.attrs, has_residual=data.has_residual)
    assert call_.launch == kernels.launch_geometry(data.x.shape, data.out_channels, data.attrs)
    assert list(call_.int_args) == kernels.kernel_int_args(data.x.shape, data.out_channels, data.attrs,
                                                           has_residual=case.residual)  # fmt: skip
    named = dict(zip(kernels.KERNEL_INT_ARGS, call_.int_args, strict=True))
    assert named["threshold_bits"] == kernels.float_bits(case.geometry.threshold) and named["n"] == 2
    assert (named["zero_sign"], named["pad_value"]) == (case.zero_sign, case.pad_value)
    assert (named["activation"], named["has_residual"]) == (ACTIVATIONS.index(case.activation), int(case.residual))
    inputs, outputs = [0x7F0000001000 + 256 * i for i in range(6)], [0x7F0000009000]
    params = gpu_selftest.kernel_params(inputs, call_.int_args, outputs)
    ptx_kind = {8: "u64", 4: "u32"}
    assert [ptx_kind[ctypes.sizeof(value)] for value in params.values] == entry_params(kernels.compile_ptx("sm_80"))
    assert [type(v) for v in params.values] == [ctypes.c_uint64] * 6 + [ctypes.c_int32] * 21 + [ctypes.c_uint64]
    assert list(params.array) == [ctypes.addressof(value) for value in params.values]
    pointed = [ctypes.cast(address, ctypes.POINTER(type(value))).contents.value
               for address, value in zip(params.array, params.values, strict=True)]  # fmt: skip
    assert pointed == [*inputs, *call_.int_args, *outputs]


def test_kernel_params_refuse_a_wrong_signature() -> None:
    args = [0] * len(kernels.KERNEL_INT_ARGS)
    with pytest.raises(ValueError, match=r"takes \(6, 21, 1\)"):
        gpu_selftest.kernel_params([1, 2, 3, 4], args, [5])  # the version-1 signature
    with pytest.raises(ValueError, match="out of range"):
        gpu_selftest.kernel_params([1, 2, 3, 4, 5, 6], [2**31, *args[1:]], [7])


def test_first_mismatch_compares_bits() -> None:
    want = np.array([[1.0, 0.0, np.nan]], dtype=np.float32)
    assert gpu_selftest.first_mismatch(want.copy(), want) is None
    signed_zero = np.array([[1.0, -0.0, np.nan]], dtype=np.float32)
    found = gpu_selftest.first_mismatch(signed_zero, want)
    assert found == gpu_selftest.Mismatch(1, (0, 1), "-0.0 (0x80000000)", "0.0 (0x00000000)")
    off = want.copy()
    off[0, 0] = np.nextafter(np.float32(1.0), np.float32(2.0))
    off[0, 2] = np.float32(5.0)
    found = gpu_selftest.first_mismatch(off, want)
    assert found is not None and found.count == 2 and found.index == (0, 0) and "0x3f800001" in found.got
    assert gpu_selftest.first_mismatch(want[:, :2], want).count == -1


class HostKernel:
    """Stands in for PtxModule on the CPU: decodes kernelParams as cuLaunchKernel does (an array of pointers to
    the values) and runs the op on the host memory they point at (CPU torch tensors), so a parameter in the
    wrong place or of the wrong width, or a launch grid that disagrees with the arguments, fails here."""

    def launch(self, launch: kernels.Launch, params: ctypes.Array, *, stream: int) -> None:
        assert len(params) == 28 and stream == 0
        addresses = list(params)

        def value(index: int, ctype: type) -> int:
            return ctypes.cast(addresses[index], ctypes.POINTER(ctype)).contents.value

        def host(pointer: int, ctype: type, shape: tuple[int, ...]) -> np.ndarray:
            return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctype)), shape=shape)

        x_ptr, w_ptr, alpha_ptr, bias_ptr, residual_ptr, slope_ptr, y_ptr = (
            value(i, ctypes.c_uint64) for i in (0, 1, 2, 3, 4, 5, 27))  # fmt: skip
        a = dict(zip(kernels.KERNEL_INT_ARGS, (value(6 + i, ctypes.c_int32) for i in range(21)), strict=True))
        n, c, h, w, cout, kh, kw = (a[k] for k in ("n", "c", "h", "w", "out_channels", "kernel_h", "kernel_w"))
        (sh, sw), (dh, dw) = (a["stride_h"], a["stride_w"]), (a["dilation_h"], a["dilation_w"])
        bottom = max(0, (a["out_h"] - 1) * sh + dh * (kh - 1) - a["pad_top"] - (h - 1))  # the rows the kernel reads
        right = max(0, (a["out_w"] - 1) * sw + dw * (kw - 1) - a["pad_left"] - (w - 1))
        attrs = BinaryConvAttrs(
            kernel_shape=(kh, kw), in_channels=c, strides=(sh, sw), pads=(a["pad_top"], a["pad_left"], bottom, right),
            dilations=(dh, dw), group=a["group"], threshold=float(np.int32(a["threshold_bits"]).view(np.float32)),
            zero_sign=a["zero_sign"], pad_value=a["pad_value"], activation=ACTIVATIONS[a["activation"]],
        )  # fmt: skip
        assert attrs.output_size(h, w) == (a["out_h"], a["out_w"])
        assert launch == kernels.launch_geometry((n, c, h, w), cout, attrs)
        w_words = host(w_ptr, ctypes.c_int32, (cout, kh, kw, attrs.words * 2))
        weight = unpack_weights(w_words.view(np.uint8), attrs.group_channels)
        alpha, bias = host(alpha_ptr, ctypes.c_float, (cout,)), host(bias_ptr, ctypes.c_float, (cout,))
        y_shape = (n, cout, a["out_h"], a["out_w"])
        # like the kernel, read the residual and slope only when present (an empty tensor's pointer may be null)
        residual = host(residual_ptr, ctypes.c_float, y_shape) if a["has_residual"] else None
        slope = host(slope_ptr, ctypes.c_float, (cout,)) if attrs.activation == "prelu" else None
        x = host(x_ptr, ctypes.c_float, (n, c, h, w))
        _, out = binary_conv2d_ref(x, weight, alpha, bias, attrs, residual=residual, slope=slope)
        host(y_ptr, ctypes.c_float, out.shape)[...] = out


class NoLaunch:
    def launch(self, launch: kernels.Launch, params: ctypes.Array, *, stream: int) -> None:
        pass


@pytest.mark.parametrize("index", [0, 13, 40, 62, 95, 100, FIRST_EPILOGUE + 2, FIRST_EPILOGUE + 4,
                                   FIRST_EPILOGUE + 6])  # fmt: skip
def test_runner_hands_the_kernel_the_buffers_and_arguments_of_the_case(index: int) -> None:
    import torch

    case = gpu_selftest.kernel_cases()[index]
    runner = gpu_selftest.KernelRunner(torch, HostKernel(), device="cpu")
    result = runner.check(case.name, case.group, gpu_selftest.case_data(case))
    assert result.ok, result.mismatch
    _, mismatch = runner.run(gpu_selftest.stage_data(64, 9))
    assert mismatch is None


def test_runner_catches_a_kernel_that_writes_nothing() -> None:
    import torch

    case = gpu_selftest.kernel_cases()[0]
    data = gpu_selftest.case_data(case)
    result = gpu_selftest.KernelRunner(torch, NoLaunch(), device="cpu").check(case.name, case.group, data)
    assert result.mismatch is not None and result.mismatch.count == data.expected.size
    assert result.mismatch.got.startswith("nan")


def fake_report(*, mismatch: gpu_selftest.Mismatch | None = None) -> gpu_selftest.SelfTestReport:
    launch = kernels.Launch((1, 1, 2), (kernels.THREADS, 1, 1), 0)
    cases = tuple(
        gpu_selftest.CaseResult(case.name, case.group, (2, case.geometry.c, 4, 4), case.geometry.cout, launch,
                                mismatch if i == 5 else None)
        for i, case in enumerate(gpu_selftest.kernel_cases())
    )  # fmt: skip
    timings = (
        gpu_selftest.Timing("kernel", 0.05),
        gpu_selftest.Timing("cudnn_fp32", 0.4),
        gpu_selftest.Timing("cudnn_tf32", 0.2),
        gpu_selftest.Timing("cudnn_fp16", 0.1),
        gpu_selftest.Timing("int8_gemm", skipped="_int_mm: no kernel for this GPU"),
    )
    stages = tuple(gpu_selftest.StageResult(c, s, "CPU kernel", None, timings) for c, s in RESNET18_STAGES)
    probe = GpuProbe((H200,), "13.0", "580.65.06", "cuda-python driver API")
    return gpu_selftest.SelfTestReport(H200, probe, "sm_90", "nvcc", {"torch": "2.14.1"}, cases, stages, 42.0)


def test_report_ratios_summary_and_atomic_file(tmp_path: Path) -> None:
    report = fake_report()
    assert report.stages[0].speedups() == pytest.approx({"cudnn_fp32": 8.0, "cudnn_tf32": 4.0, "cudnn_fp16": 2.0})
    data = report.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["ok"] and data["bit_exact"]["passed"] == data["bit_exact"]["total"] == len(report.cases)
    assert data["device"]["name"] == "NVIDIA H200" and data["driver"] == {"cuda": "13.0", "release": "580.65.06"}
    stage = data["stages"][0]
    assert stage["input"] == [1, 64, 200, 200] and stage["speedup_vs"]["cudnn_fp32"] == pytest.approx(8.0)
    assert stage["skipped"] == {"int8_gemm": "_int_mm: no kernel for this GPU"}
    assert stage["labels"]["int8_gemm"] == "int8 GEMM (torch._int_mm), conv as GEMM"
    total = len(report.cases)
    assert gpu_selftest.summary_line(report).startswith(f"GPU self-test passed on NVIDIA H200 (sm_90 PTX): {total}/")
    path = tmp_path / "out" / "gpu.json"
    gpu_selftest.write_report(report, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(data)) and [p.name for p in path.parent.iterdir()] == [
        "gpu.json"
    ]  # fmt: skip
    console = Console(record=True, width=200)
    for table in gpu_selftest.selftest_tables(report):
        console.print(table)
    text = console.export_text()
    assert "0.050" in text and "0.400 (8.0x)" in text and "skipped: _int_mm" in text and "NO (" not in text


def test_a_mismatch_fails_with_one_summary_line() -> None:
    mismatch = gpu_selftest.Mismatch(3, (0, 1, 2, 3), "0.5 (0x3f000000)", "0.75 (0x3f400000)")
    report = fake_report(mismatch=mismatch)
    assert not report.ok and not report.to_dict()["ok"]
    line = gpu_selftest.summary_line(report)
    total = len(report.cases)
    assert "\n" not in line and line.startswith("GPU self-test FAILED") and f"{total - 1}/{total}" in line
    assert report.cases[5].name in line and "got 0.5 (0x3f000000), want 0.75 (0x3f400000)" in line
