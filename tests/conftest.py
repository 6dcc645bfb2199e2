"""Shared fixtures: small exports reused across test modules (ThumbDet: export, verify, bench, CLI; CFINet;
SR-TOD: parity; DFR-Det's default plugin export: ISA paths, teacher forcing, check --target tensorrt, quantize;
BH Faster R-CNN, unverified: check --target tensorrt, OpenVINO)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tod_deploy.export.pipeline import ExportResult, export_model

RUN_SLOW = "TOD_RUN_SLOW"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (full-size exports)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow are skipped, with the way to run them, unless asked for: on a 2-core CI machine
    they would take a quarter of the run, and each repeats at full size what a small test checks."""
    if config.getoption("--run-slow") or os.environ.get(RUN_SLOW) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow: run with --run-slow (or {RUN_SLOW}=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


SMALL = "256x384"  # the smallest size whose coarsest level (stride 256 at 4x) is still 1x2


@pytest.fixture(scope="session")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("export")
    return export_model("thumbdet", out, overrides={"input_size": SMALL}, log=lambda _line: None)


@pytest.fixture(scope="session")
def small_onnx(small_export: ExportResult) -> Path:
    return small_export.onnx_path


@pytest.fixture(scope="session")
def small_cfinet(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("cfinet")
    return export_model("cfinet", out, overrides={"input_size": "256x256", "top_k": 100}, log=lambda _line: None)


@pytest.fixture(scope="session")
def sr_tod_small(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("sr_tod")
    return export_model("sr_tod", out, overrides={"input_size": "256x256", "top_k": 100}, log=lambda _line: None)


@pytest.fixture(scope="session")
def dfr_plugin_small(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """DFR-Det FCOS as `export` writes it by default: tod::BinaryConv2d nodes with the epilogue fused."""
    out = tmp_path_factory.mktemp("dfr_plugin")
    overrides = {"input_size": "256x256", "binary_conv": "plugin"}
    return export_model("dfr_det", out, overrides=overrides, log=lambda _line: None)


@pytest.fixture(scope="session")
def bh_small(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """BH-ResNet50 Faster R-CNN at 128x160 without the export's own parity check (test_bh proves parity)."""
    out = tmp_path_factory.mktemp("bh")
    model = {"backbone": "bh_resnet50", "detector": "faster_rcnn", "rpn_nms_pre": 300, "rpn_max_per_img": 200}
    overrides = {"input_size": "128x160", "model": model}
    return export_model("bh", out, overrides=overrides, verify=False, name="bh", log=lambda _line: None)
