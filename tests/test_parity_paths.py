"""The same verdict on every CPU path: the 1-bit kernel forced to each ISA path, onnxruntime at 1
and 2 threads. Reduction order differs between these paths (and between Intel and AMD machines),
so a value at a decision boundary may flip on one and not another: parity must hold on all."""

from __future__ import annotations

import pytest

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends.onnxruntime_runner import load_onnx
from tod_deploy.export.pipeline import ExportResult, export_model, rebuild_deploy_model
from tod_deploy.export.verify import verify_onnx
from tod_deploy.ops import binary_conv_cpu

THREADS = (1, 2)


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def dfr_unfused(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("dfr_unfused")
    overrides = {"input_size": "256x256", "binary_conv": "plugin-unfused"}
    return export_model("dfr_det", out, overrides=overrides, log=quiet)


def _reverify(export: ExportResult, threads: int):  # noqa: ANN202
    """One seeded input per path (the export itself checked three): DFR-Det's is 53 M binary decisions,
    SR-TOD's 65,536 mask signs, so a path's boundary flips have every chance to show."""
    sidecar = Sidecar.load(export.onnx_path)
    deploy = rebuild_deploy_model(sidecar, quiet)
    return verify_onnx(load_onnx(export.onnx_path), deploy, sidecar.recipe, seeds=(0,), threads=threads)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("isa", binary_conv_cpu.ISAS)
def test_one_bit_parity_on_every_isa_path(dfr_plugin_small: ExportResult, isa: str, threads: int) -> None:
    """The default export (every Bi-Real block's Add and PReLU fused into its node)."""
    if isa not in binary_conv_cpu.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {', '.join(binary_conv_cpu.supported_isas())})")
    with binary_conv_cpu.use_isa(isa):
        report = _reverify(dfr_plugin_small, threads)
    assert report.ok, f"{isa}, {threads} threads: {report.failure()}"
    layers = report.decision("binary layers")
    assert layers.sites == 16 + 8 * 5 and layers.output.max_abs == 0.0  # integer sums: exact on every path
    assert layers.flips == layers.excused


@pytest.mark.parametrize("isa", binary_conv_cpu.ISAS)
def test_unfused_one_bit_parity_on_every_isa_path(dfr_unfused: ExportResult, isa: str) -> None:
    if isa not in binary_conv_cpu.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {', '.join(binary_conv_cpu.supported_isas())})")
    with binary_conv_cpu.use_isa(isa):
        report = _reverify(dfr_unfused, threads=2)
    assert report.ok, f"{isa}: {report.failure()}"
    assert report.decision("binary layers").output.max_abs == 0.0


@pytest.mark.parametrize("threads", THREADS)
def test_thumbdet_parity_at_each_thread_count(small_export: ExportResult, threads: int) -> None:
    report = _reverify(small_export, threads)
    assert report.ok, f"{threads} threads: {report.failure()}"


@pytest.mark.parametrize(
    "threads", [1, pytest.param(2, marks=pytest.mark.slow)]
)  # 2 threads: what the fixture's own export verified on a 2-core machine
def test_sr_tod_parity_at_each_thread_count(sr_tod_small: ExportResult, threads: int) -> None:
    report = _reverify(sr_tod_small, threads)
    assert report.ok, f"{threads} threads: {report.failure()}"
    mask = report.decision("net.mask_sign")
    assert mask.decisions == 256 * 256 and mask.flips == mask.excused
