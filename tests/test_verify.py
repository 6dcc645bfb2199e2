"""The parity checker itself: tolerances, decisions judged by their margin, detection matching,
and catching a broken graph."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tod_deploy.artifacts import Sidecar
from tod_deploy.export.pipeline import ExportResult, rebuild_deploy_model, reverify
from tod_deploy.export.verify import verify_onnx
from tod_deploy.parity.comparator import compare_into, verification_images
from tod_deploy.parity.decisions import DecisionRecord, DecisionSite, judge
from tod_deploy.parity.detections import DetectionRule, agree_detections, box_iou, new_agreement
from tod_deploy.parity.policy import FP32, PRECISION_POLICIES
from tod_deploy.parity.report import DecisionParity, OutputParity


def compare_arrays(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> OutputParity:
    row = OutputParity("x", atol, rtol)
    compare_into(row, ref, got, replace(FP32, atol=atol, rtol=rtol, scale_rtol=0.0))
    return row


def test_element_fails_only_above_both_tolerances() -> None:
    ref = np.array([1.0, 100.0, 0.0, 1e-6])
    got = np.array([1.0 + 5e-5, 100.05, 2e-4, 2e-6])
    # 5e-5 < atol; 0.05 > atol but < rtol*100; 2e-4 > atol and > rtol*0; 1e-6 < atol
    p = compare_arrays(ref, got, atol=1e-4, rtol=1e-3)
    assert p.failing == 1 and abs(p.max_abs - 0.05) < 1e-9
    assert compare_arrays(ref, ref, 0, 0).failing == 0
    assert compare_arrays(ref, np.array([np.nan, 100.0, 0.0, 1e-6]), 1, 1).failing == 1
    assert compare_arrays(ref, ref[:2], 1, 1).failing == ref.size


def test_dense_atol_scales_with_the_tensor_not_with_the_element() -> None:
    """An element near 0 of a tensor of O(4) values may carry the rounding of O(4) sums (seen: 1.08e-4
    in SR-TOD's RPN deltas, RMS 3.7); the same error in a tensor of O(0.1) values, or 1e-3, fails."""
    rng = np.random.default_rng(0)
    big = (rng.standard_normal(1000) * 4).astype(np.float32)
    big[0] = 2e-4
    nudged = big.copy()
    nudged[0] += 1.1e-4
    row = OutputParity("rpn_bbox_deltas", 1e-4, 1e-3)
    compare_into(row, big, nudged, FP32)
    assert row.ok and row.atol == pytest.approx(1e-4 * np.sqrt(np.mean(big.astype(np.float64) ** 2)))
    small = big / 40
    small[0] = 2e-4
    moved = small.copy()
    moved[0] += 1.1e-4
    assert compare_arrays_scaled(small, moved).failing == 1  # atol stays 1e-4: RMS 0.1
    far = big.copy()
    far[0] += 1e-3
    assert compare_arrays_scaled(big, far).failing == 1
    pixels = OutputParity("boxes", 1e-4, 1e-3)
    compare_into(pixels, big, nudged, FP32, scaled=False)  # pixel tensors keep their own atol
    assert pixels.failing == 1 and pixels.atol == 1e-4


def compare_arrays_scaled(ref: np.ndarray, got: np.ndarray) -> OutputParity:
    row = OutputParity("x", 1e-4, 1e-3)
    compare_into(row, ref, got, FP32)
    return row


def test_rel_rms_accumulates_over_inputs() -> None:
    row = OutputParity("x", 1.0, 1.0)
    for _ in range(2):
        compare_into(row, np.array([3.0, 4.0]), np.array([3.0, 4.5]), FP32)
    assert row.rel_rms == pytest.approx(0.5 / 5.0) and row.total == 4


def _sign_record(ref_in: list[float], got_in: list[float]) -> DecisionRecord:
    ref, got = np.array(ref_in, np.float32), np.array(got_in, np.float32)
    site = DecisionSite("threshold", "net.mask_sign", "sub", "sign")
    return DecisionRecord(site, ref, got, np.sign(ref), np.sign(got), np.sign(got), np.sign(got))


def _judged(record: DecisionRecord) -> DecisionParity:
    row = DecisionParity("mask", "threshold", 1, OutputParity("mask input", 1e-4, 1e-3), OutputParity("mask", 0, 0))
    judge(record, row, FP32)
    return row


def test_a_flip_at_the_threshold_is_excused() -> None:
    # 3e-5 and -2e-5 straddle the boundary 0 but agree within atol 1e-4: legitimate rounding.
    row = _judged(_sign_record([0.5, 3e-5, -0.2], [0.5, -2e-5, -0.2]))
    assert (row.flips, row.excused, row.decisions) == (1, 1, 3) and row.ok
    assert row.flips_line() == "1 flip at the threshold, excused"


def test_a_flip_away_from_the_threshold_fails() -> None:
    # 0.015 vs -0.005: a threshold moved by 0.02, not rounding.
    row = _judged(_sign_record([0.5, 0.015, -0.2], [0.5, -0.005, -0.2]))
    assert (row.flips, row.excused) == (1, 0) and not row.ok
    assert "1 of 3 decisions flipped away from the threshold" in row.failure()


def test_forced_output_must_follow_the_backend_decision() -> None:
    record = _sign_record([0.5, 0.1], [0.5, 0.1])
    record.got_output = np.array([1.0, -1.0], np.float32)  # the backend's Sign disagrees with its own input
    row = _judged(record)
    assert row.flips == 0 and not row.ok and "teacher-forced" in row.failure()


def _dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, np.ndarray]:
    return {
        "num_dets": np.array([len(scores)], np.int32),
        "boxes": np.array([boxes], np.float32),
        "scores": np.array([scores], np.float32),
        "labels": np.array([labels], np.int32),
    }


def _agree(ref: dict, got: dict, nms_iou: float | None = None, policy=FP32):  # noqa: ANN001, ANN202
    agreement = new_agreement(policy)
    agree_detections(ref, got, DetectionRule(0.0, nms_iou), agreement, policy)
    return agreement


def test_detections_match_regardless_of_order() -> None:
    ref = _dets([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 6, 6]], [0.9, 0.8, 0.1], [1, 2, 3])
    got = _dets([[20, 20, 40, 40], [0, 0, 10, 10], [5, 5, 6, 6]], [0.8, 0.9, 0.1], [2, 1, 3])
    agreement = _agree(ref, got)
    # the last one sits on the top-K boundary and is not checked
    assert agreement.checked == 2 and agreement.matched == 2 and agreement.ok


def test_zero_area_boxes_match_only_themselves() -> None:
    points = np.array([[5.0, 5.0, 5.0, 5.0], [7.0, 7.0, 7.0, 7.0]])
    assert box_iou(points, points).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_detections_disagree_on_label_or_box() -> None:
    ref = _dets([[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 1, 1]], [0.9, 0.8, 0.1], [1, 2, 3])
    got = _dets([[0, 0, 10, 12], [20, 20, 40, 40], [0, 0, 1, 1]], [0.9, 0.8, 0.1], [1, 5, 3])
    agreement = _agree(ref, got)
    assert agreement.matched == 0 and not agreement.ok and agreement.min_iou < 0.99
    assert _agree(ref, got, policy=PRECISION_POLICIES["int8"]).matched == 1  # IoU 0.83 passes int8's 0.5


def test_nms_near_tie_is_excused_but_a_real_swap_is_not() -> None:
    # Reference kept A (0.30000) and suppressed B; the candidate kept B (0.30004), which overlaps A
    # at IoU 0.68 > the NMS threshold 0.5: which of the two survives depends on a 4e-5 tie.
    ref = _dets([[0, 0, 10, 10], [50, 50, 60, 60], [90, 90, 99, 99]], [0.9, 0.30000, 0.1], [1, 1, 2])
    tie = _dets([[0, 0, 10, 10], [51, 51, 61, 61], [90, 90, 99, 99]], [0.9, 0.30004, 0.1], [1, 1, 2])
    agreement = _agree(ref, tie, nms_iou=0.5)
    assert agreement.checked == 2 and agreement.matched == 1 and agreement.near_ties == 1 and agreement.ok
    gap = _dets([[0, 0, 10, 10], [51, 51, 61, 61], [90, 90, 99, 99]], [0.9, 0.35, 0.1], [1, 1, 2])
    agreement = _agree(ref, gap, nms_iou=0.5)
    assert agreement.near_ties == 0 and not agreement.ok  # a 0.05 score gap is no tie
    agreement = _agree(ref, tie, nms_iou=None)  # no NMS in the graph: no excuse
    assert agreement.near_ties == 0 and not agreement.ok


def test_nms_iou_tie_is_excused_but_a_clear_overlap_is_not() -> None:
    # Reference kept B (0.3): its IoU with A (0.9) is 0.49997, under the NMS threshold 0.5. The candidate's
    # boxes, off by rounding, put it at the threshold and suppressed B: an IoU tie, not a score tie.
    ref = _dets([[0, 0, 10, 10], [3.3336, 0, 13.3336, 10], [90, 90, 99, 99]], [0.9, 0.3, 0.1], [1, 1, 2])
    got = _dets([[0, 0, 10, 10], [90, 90, 99, 99]], [0.9, 0.1], [1, 2])
    agreement = _agree(ref, got, nms_iou=0.5)
    assert agreement.checked == 2 and agreement.matched == 1 and agreement.near_ties == 1 and agreement.ok
    clear = _dets([[0, 0, 10, 10], [4, 0, 14, 10], [90, 90, 99, 99]], [0.9, 0.3, 0.1], [1, 1, 2])  # IoU 0.43
    agreement = _agree(clear, got, nms_iou=0.5)
    assert agreement.near_ties == 0 and not agreement.ok


def _boxes_and_scores(*boxes: tuple[list[float], float], capacity: int = 0) -> dict[str, np.ndarray]:
    """One image's kept boxes (label 1), padded to ``capacity`` slots as a graph's fixed outputs are."""
    n, slots = len(boxes), max(capacity, len(boxes))
    out = _dets([b for b, _ in boxes] + [[0, 0, 0, 0]] * (slots - n), [s for _, s in boxes] + [-1.0] * (slots - n),
                [1] * slots)  # fmt: skip
    out["num_dets"] = np.array([n], np.int32)
    return out


# Boxes overlapping A at IoU 0.54 (over an NMS threshold of 0.5) and each other at most at 0.32.
A, B1, B2, B3, B4 = [0, 0, 10, 10], [3, 0, 13, 10], [-3, 0, 7, 10], [0, 3, 10, 13], [0, -3, 10, 7]
C = [6, 0, 16, 10]  # overlaps B1 at 0.54, A at 0.25
FAR, FAR2, FAR3 = [50, 50, 60, 60], [80, 80, 90, 90], [20, 80, 30, 90]


def test_a_box_a_near_tie_changed_is_excused_with_it() -> None:
    # A and B1 tie exactly. The reference took A first and kept C; the candidate took B1, which suppressed C.
    ref = _boxes_and_scores((A, 0.5), (C, 0.4), (FAR, 0.3), (FAR2, 0.1))
    got = _boxes_and_scores((B1, 0.5), (FAR, 0.3), (FAR2, 0.1))
    agreement = _agree(ref, got, nms_iou=0.5)
    assert (agreement.checked, agreement.matched, agreement.near_ties, agreement.cascaded) == (3, 1, 1, 1)
    assert agreement.ok
    # B1 clearly outscores A: no tie, so neither A's loss nor C's is explained.
    got = _boxes_and_scores((B1, 0.6), (FAR, 0.3), (FAR2, 0.1))
    agreement = _agree(ref, got, nms_iou=0.5)
    assert (agreement.near_ties, agreement.cascaded) == (0, 0) and not agreement.ok


def test_near_ties_beyond_the_share_pass_only_where_the_reference_ties_exactly() -> None:
    # Three tie swaps in 5 checked boxes: far more than 1 %. Where the reference scores the three exactly
    # alike (a plateau: dead features), which of them a runtime keeps is its own choice.
    def swaps(scores: list[float]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        def apart(box: list[float]) -> list[list[float]]:  # the pair's box, once per swap, 100 px apart
            return [[box[0] + 100 * k, box[1], box[2] + 100 * k, box[3]] for k in range(len(scores))]

        rest = ((FAR, 0.3), (FAR2, 0.2), (FAR3, 0.1))
        ref = _boxes_and_scores(*zip(apart(A), scores, strict=True), *rest)
        return ref, _boxes_and_scores(*zip(apart(B1), scores, strict=True), *rest)

    agreement = _agree(*swaps([0.5, 0.5, 0.5]), nms_iou=0.5)
    assert (agreement.checked, agreement.near_ties, agreement.tied) == (5, 3, 3) and agreement.ok
    agreement = _agree(*swaps([0.5, 0.45, 0.4]), nms_iou=0.5)  # three ties, each exact, none shared
    assert (agreement.near_ties, agreement.tied) == (3, 0) and not agreement.ok


def test_boxes_pushed_off_a_full_list_by_tied_ones_are_excused() -> None:
    # The reference kept A of five tied boxes; the candidate kept the four Bs, filled its five places,
    # and so dropped the reference's last two (the very last is on the selection floor, not checked).
    ref = _boxes_and_scores((A, 0.5), (FAR, 0.3), (FAR2, 0.2), (FAR3, 0.1), capacity=5)
    got = _boxes_and_scores((B1, 0.5), (B2, 0.5), (B3, 0.5), (B4, 0.5), (FAR, 0.3), capacity=5)
    agreement = _agree(ref, got, nms_iou=0.5)
    assert (agreement.checked, agreement.matched, agreement.near_ties, agreement.cascaded) == (3, 1, 1, 1)
    assert agreement.ok
    got = _boxes_and_scores((B1, 0.5), (B2, 0.5), (B3, 0.5), (B4, 0.5), (FAR, 0.3), capacity=6)  # room left
    assert not _agree(ref, got, nms_iou=0.5).ok


def test_only_boxes_above_the_selection_floor_are_counted() -> None:
    """Proposals of a trained RPN whose objectness underflows: PyTorch scores them 1e-20 and below, where
    onnxruntime's Sigmoid gives exactly 0, and NMS among the zeros keeps more of them. Boxes within the
    margin of the score threshold (0 here) are not counted; two more above it are, and fail."""
    far = [[100.0 + 20 * k, 0.0, 110.0 + 20 * k, 10.0] for k in range(6)]
    ref = _dets([[0, 0, 10, 10], far[0], far[1]], [0.9, 1e-20, 1e-21], [0, 0, 0])
    got = _dets([[0, 0, 10, 10], far[0], far[1], far[2], far[3]], [0.9, 0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0, 0])
    agreement = _agree(ref, got, nms_iou=0.7)
    assert agreement.count_diff == 0 and agreement.matched == 1 and agreement.ok
    got = _dets([[0, 0, 10, 10], far[4], far[5], far[0]], [0.9, 0.3, 0.2, 0.0], [0, 0, 0, 0])
    agreement = _agree(ref, got, nms_iou=0.7)
    assert agreement.count_diff == 2 and not agreement.ok


def test_coinciding_boxes_match_by_score() -> None:
    # Clipped to the image, two proposals can be the same box; each reference one has its own partner.
    full = [0, 0, 512, 512]
    ref = _dets([full, full, [90, 90, 99, 99]], [0.99, 0.36, 0.1], [1, 1, 1])
    got = _dets([full, full, [90, 90, 99, 99]], [0.99, 0.36, 0.1], [1, 1, 1])
    agreement = _agree(ref, got, nms_iou=0.7)
    assert agreement.checked == 2 and agreement.matched == 2 and agreement.near_ties == 0


def test_verify_catches_a_corrupted_weight(small_onnx: Path) -> None:
    model = onnx.load(str(small_onnx))
    target = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size if t.data_type == 1 else 0)
    array = numpy_helper.to_array(target).copy()
    array.flat[: array.size // 50] *= 1.5
    target.CopyFrom(numpy_helper.from_array(array, target.name))
    sidecar = Sidecar.load(small_onnx)
    report = verify_onnx(model, rebuild_deploy_model(sidecar, lambda _l: None), sidecar.recipe, seeds=(0,))
    assert not report.ok
    assert "exceed atol" in report.failure() or "detections" in report.failure()


def test_reverify_from_file(small_onnx: Path) -> None:
    report = reverify(small_onnx, log=lambda _l: None)
    assert report.ok and report.inputs == 3


def quiet(_line: str) -> None:
    pass


def _set_initializer(model: onnx.ModelProto, name: str, change) -> None:  # noqa: ANN001
    target = next(t for t in model.graph.initializer if t.name == name)
    before = numpy_helper.to_array(target).copy()
    # the file's dtype kept: numpy 1 promotes a 0-d float32 plus a Python float to float64
    target.CopyFrom(numpy_helper.from_array(np.asarray(change(before)).astype(before.dtype), name))


def _threshold_at_a_pixel(export: ExportResult, onnx_shift: float):  # noqa: ANN202
    """PyTorch's threshold set exactly to one pixel's difference-map value, the file's moved by ``onnx_shift``:
    that pixel (and any within the shift) decides differently in the two runtimes."""
    sidecar = Sidecar.load(export.onnx_path)
    deploy, recipe = rebuild_deploy_model(sidecar, quiet), sidecar.recipe
    with torch.inference_mode():
        diff = deploy.run(torch.from_numpy(verification_images(recipe, 1, 0)))["diff_map"]
    threshold = float(diff.flatten().median())
    deploy.net.learnable_thresh.data.fill_(threshold)
    model = onnx.load(str(export.onnx_path))
    _set_initializer(model, "model.net.learnable_thresh", lambda a: np.full_like(a, threshold + onnx_shift))
    return model, deploy, recipe


def test_a_threshold_flip_within_tolerance_is_excused_and_forced(sr_tod_small: ExportResult) -> None:
    model, deploy, recipe = _threshold_at_a_pixel(sr_tod_small, 5e-5)  # within atol 1e-4: rounding-sized
    report = verify_onnx(model, deploy, recipe, seeds=(0,))
    mask = report.decision("net.mask_sign")
    assert mask.flips >= 1 and mask.excused == mask.flips, mask
    assert report.ok, report.failure()  # downstream tensors compared teacher-forced, so they still agree
    assert report.excused_flips == mask.flips and "at the threshold, excused" in mask.flips_line()


def test_a_moved_threshold_fails(sr_tod_small: ExportResult) -> None:
    model, deploy, recipe = _threshold_at_a_pixel(sr_tod_small, 0.02)
    report = verify_onnx(model, deploy, recipe, seeds=(0,))
    assert not report.ok
    assert "net.mask_sign:" in report.failure() and "flipped away from the threshold" in report.failure()


def test_a_shifted_box_head_bias_fails(sr_tod_small: ExportResult) -> None:
    model = onnx.load(str(sr_tod_small.onnx_path))
    _set_initializer(model, "model.net.roi_head.bbox_head.fc_reg.bias", lambda a: a + 0.5)
    sidecar = Sidecar.load(sr_tod_small.onnx_path)
    report = verify_onnx(model, rebuild_deploy_model(sidecar, quiet), sidecar.recipe, seeds=(0,))
    assert not report.ok and report.failure().startswith("detections:"), report.failure()
    assert report.decision("net.mask_sign").flips == 0  # the threshold is not what failed


@pytest.mark.slow  # the CLI face of test_a_moved_threshold_fails: a 1-thread verify, a minute
def test_cli_verify_names_a_moved_threshold(sr_tod_small: ExportResult, tmp_path: Path) -> None:
    """As a user meets it: ``tod-deploy verify`` on a file whose threshold was moved, one line, exit 2."""
    import shutil
    import subprocess
    import sys

    moved = tmp_path / sr_tod_small.onnx_path.name
    shutil.copy(sr_tod_small.sidecar_path, tmp_path / sr_tod_small.sidecar_path.name)
    model = onnx.load(str(sr_tod_small.onnx_path))
    _set_initializer(model, "model.net.learnable_thresh", lambda a: a + 0.02)
    onnx.save(model, str(moved))
    cmd = [sys.executable, "-m", "tod_deploy.cli", "verify", str(moved), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    # The decision's input (difference map minus threshold) is 0.02 off everywhere; flips follow where
    # pixels lie between the two thresholds.
    assert errors[0].startswith("error: verification failed: net.mask_sign"), errors[0]
    assert "FAIL" in proc.stdout  # the table shows the row


def test_a_file_without_named_decisions_pairs_them_in_order(sr_tod_small: ExportResult) -> None:
    """Files written before Sign nodes were named after their module still verify: the one unnamed
    Sign pairs with the one decision module no named node claims."""
    model = onnx.load(str(sr_tod_small.onnx_path))
    sign = next(n for n in model.graph.node if n.op_type == "Sign")
    assert sign.name == "net.mask_sign"  # named at export from the exporter's name scopes
    sign.name = "node_sign"  # as torch.onnx names it
    sidecar = Sidecar.load(sr_tod_small.onnx_path)
    report = verify_onnx(model, rebuild_deploy_model(sidecar, quiet), sidecar.recipe, seeds=(0,))
    assert report.ok, report.failure()
    assert report.decision("net.mask_sign").decisions == 256 * 256


def test_engines_and_quantized_files_are_judged_by_the_rule_the_export_stored(sr_tod_small: ExportResult) -> None:
    """Without PyTorch (an engine against its ONNX, INT8 against FP32) the selection rule comes from the
    file's ``parity`` metadata: the same score threshold and NMS near-tie rule as the export's own check."""
    from tod_deploy.backends.onnxruntime_runner import load_onnx
    from tod_deploy.export.verify import plan_for

    model = load_onnx(sr_tod_small.onnx_path)
    recipe = Sidecar.load(sr_tod_small.onnx_path).recipe
    plan = plan_for(model, recipe, ["rpn_cls_logits"])
    assert plan.detections == DetectionRule(recipe.score_threshold, 0.5)  # SR-TOD's final NMS IoU
    del model.metadata_props[:]  # a file written before the rule was stored: the recipe's threshold, no NMS rule
    assert plan_for(model, recipe, []).detections == DetectionRule(recipe.score_threshold, None)
    report = sr_tod_small.verification
    assert [s.name for s in report.selections] == ["proposals"] and report.selections[0].checked > 0


def test_a_tiny_box_matches_by_pixels_when_its_iou_cannot() -> None:
    # A box 0.1 px wide: 1.5e-3 px of rounding costs it 1.5% IoU, but every coordinate is within the
    # pixel tolerance (16 float32 ulps of the 800-px extent, 1.53e-3 px).
    ref = _dets([[10.0, 10.0, 10.1, 20.0], [50, 50, 60, 60]], [0.9, 0.1], [1, 1])
    got = _dets([[10.0, 10.0, 10.0985, 20.0], [50, 50, 60, 60]], [0.9, 0.1], [1, 1])
    assert _agree(ref, got).matched == 0  # IoU 0.985 < 0.99
    agreement = new_agreement(FP32)
    box_atol = FP32.tolerance((800, 800))[0]
    agree_detections(ref, got, DetectionRule(0.0), agreement, FP32, box_atol)
    assert agreement.matched == 1 and agreement.ok
    far = _dets([[10.0, 10.0, 10.09, 20.0], [50, 50, 60, 60]], [0.9, 0.1], [1, 1])  # 0.01 px: not rounding
    agreement = new_agreement(FP32)
    agree_detections(ref, far, DetectionRule(0.0), agreement, FP32, box_atol)
    assert agreement.matched == 0 and not agreement.ok
