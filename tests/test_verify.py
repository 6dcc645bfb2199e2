"""The parity checker itself: tolerances, detection matching, and catching a broken graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tod_deploy.export.pipeline import read_sidecar, rebuild_deploy_model, recipe_of, reverify
from tod_deploy.export.verify import DetectionAgreement, agree_detections, compare_arrays, verify_onnx


def test_element_fails_only_above_both_tolerances() -> None:
    ref = np.array([1.0, 100.0, 0.0, 1e-6])
    got = np.array([1.0 + 5e-5, 100.05, 2e-4, 2e-6])
    # 5e-5 < atol; 0.05 > atol but < rtol*100; 2e-4 > atol and > rtol*0; 1e-6 < atol
    p = compare_arrays("x", ref, got, atol=1e-4, rtol=1e-3)
    assert p.failing == 1 and p.max_abs == np.float64(2e-4) or abs(p.max_abs - 0.05) < 1e-9
    assert compare_arrays("x", ref, ref, 0, 0).failing == 0
    assert compare_arrays("x", ref, np.array([np.nan, 100.0, 0.0, 1e-6]), 1, 1).failing == 1
    assert compare_arrays("x", ref, ref[:2], 1, 1).failing == ref.size


def _dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, np.ndarray]:
    return {
        "num_dets": np.array([len(scores)], np.int32),
        "boxes": np.array([boxes], np.float32),
        "scores": np.array([scores], np.float32),
        "labels": np.array([labels], np.int32),
    }


def test_detections_match_regardless_of_order() -> None:
    ref = _dets([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 6, 6]], [0.9, 0.8, 0.1], [1, 2, 3])
    got = _dets([[20, 20, 40, 40], [0, 0, 10, 10], [5, 5, 6, 6]], [0.8, 0.9, 0.1], [2, 1, 3])
    agreement = DetectionAgreement()
    agree_detections(ref, got, 0.0, agreement)
    # the last one sits on the top-K boundary and is not checked
    assert agreement.checked == 2 and agreement.matched == 2 and agreement.ok


def test_zero_area_boxes_match_only_themselves() -> None:
    from tod_deploy.export.verify import box_iou

    points = np.array([[5.0, 5.0, 5.0, 5.0], [7.0, 7.0, 7.0, 7.0]])
    assert box_iou(points, points).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_detections_disagree_on_label_or_box() -> None:
    ref = _dets([[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 1, 1]], [0.9, 0.8, 0.1], [1, 2, 3])
    got = _dets([[0, 0, 10, 12], [20, 20, 40, 40], [0, 0, 1, 1]], [0.9, 0.8, 0.1], [1, 5, 3])
    agreement = DetectionAgreement()
    agree_detections(ref, got, 0.0, agreement)
    assert agreement.matched == 0 and not agreement.ok and agreement.min_iou < 0.99


def test_nms_near_tie_is_excused_but_a_real_swap_is_not() -> None:
    # Reference kept A (0.30000) and suppressed B; the candidate kept B (0.30004), which overlaps A
    # at IoU 0.68 > the NMS threshold 0.5: which of the two survives depends on a 4e-5 tie.
    ref = _dets([[0, 0, 10, 10], [50, 50, 60, 60], [90, 90, 99, 99]], [0.9, 0.30000, 0.1], [1, 1, 2])
    tie = _dets([[0, 0, 10, 10], [51, 51, 61, 61], [90, 90, 99, 99]], [0.9, 0.30004, 0.1], [1, 1, 2])
    agreement = DetectionAgreement()
    agree_detections(ref, tie, 0.0, agreement, nms_iou=0.5)
    assert agreement.checked == 2 and agreement.matched == 1 and agreement.near_ties == 1 and agreement.ok
    gap = _dets([[0, 0, 10, 10], [51, 51, 61, 61], [90, 90, 99, 99]], [0.9, 0.35, 0.1], [1, 1, 2])
    agreement = DetectionAgreement()
    agree_detections(ref, gap, 0.0, agreement, nms_iou=0.5)
    assert agreement.near_ties == 0 and not agreement.ok  # a 0.05 score gap is no tie
    agreement = DetectionAgreement()
    agree_detections(ref, tie, 0.0, agreement, nms_iou=None)  # no NMS in the graph: no excuse
    assert agreement.near_ties == 0 and not agreement.ok


def test_verify_catches_a_corrupted_weight(small_onnx: Path) -> None:
    model = onnx.load(str(small_onnx))
    target = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size if t.data_type == 1 else 0)
    array = numpy_helper.to_array(target).copy()
    array.flat[: array.size // 50] *= 1.5
    target.CopyFrom(numpy_helper.from_array(array, target.name))
    sidecar = read_sidecar(small_onnx)
    report = verify_onnx(model, rebuild_deploy_model(sidecar, lambda _l: None), recipe_of(sidecar), seeds=(0,))
    assert not report.ok
    assert "exceed atol" in report.failure() or "detections" in report.failure()


def test_reverify_from_file(small_onnx: Path) -> None:
    report = reverify(small_onnx, log=lambda _l: None)
    assert report.ok and report.inputs == 3
