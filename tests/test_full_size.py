"""Every method's default recipe exported at its full input size, once, and verified.

Small test exports hide what only the real size shows: thousands of anchors near an NMS tie, a
difference map with a million pixels near its threshold, 1-bit layers at 200x200. Each export
runs the whole ``tod-deploy export`` step (PyTorch -> ONNX -> passes -> parity) and must pass,
excused flips and near-ties included, on whatever CPU runs it. Slow: minutes in all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tod_deploy.environment import environment
from tod_deploy.export.pipeline import export_model

DEFAULTS = [
    pytest.param("thumbdet", {}, id="thumbdet"),
    pytest.param("sr_tod", {"model": {"detector": "faster_rcnn"}}, id="sr_tod-faster_rcnn"),
    pytest.param("sr_tod", {"model": {"detector": "cascade_rcnn"}}, id="sr_tod-cascade_rcnn"),
    pytest.param("sr_tod", {"model": {"detector": "retinanet"}}, id="sr_tod-retinanet"),
    pytest.param("dfr_det", {"model": {"detector": "fcos"}}, id="dfr_det-fcos"),
    pytest.param("cfinet", {}, id="cfinet"),
    pytest.param("bh", {}, id="bh"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "overrides"), DEFAULTS)
def test_default_export_verifies_at_full_size(
    tmp_path: Path, method: str, overrides: dict, record_property: Callable[[str, object], None]
) -> None:
    result = export_model(method, tmp_path, overrides=overrides, log=lambda _line: None)
    report = result.verification
    assert report is not None and report.ok, report.failure()
    assert result.onnx_path.is_file() and result.sidecar["verification"]["ok"] is True
    assert all(d.flips == d.excused for d in report.decisions)
    # In the JUnit XML (--junitxml): what each decision did on this machine.
    record_property("cpu", environment()["cpu"])
    for d in report.decisions:
        record_property(d.name, f"{d.flips_line()} ({d.decisions} decisions)")
    for agreement in [*report.selections, *([report.detections] if report.detections else [])]:
        record_property(agreement.name, f"{agreement.near_ties} NMS near-ties of {agreement.checked} checked")
