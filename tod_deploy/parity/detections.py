"""Detections of two runtimes, matched one by one.

Each reference detection clear of a selection boundary (decisions.selection_floor) must have a
candidate with the same label, IoU at least ``min_iou`` (or every coordinate within ``box_atol``
pixels: a box a pixel wide loses 1% IoU to 0.005 px of rounding) and a score within ``score_tol``; among
several such boxes (clipped boxes can coincide), the one closest in score. With NMS in the graph, an
unmatched box that NMS could have decided either way (decisions.nms_near_tie: a near-equal overlapping
rival, or a higher-scoring box overlapping it at the NMS threshold) is an NMS near-tie, counted apart and
excused while rare: at most ``max_excused_share`` of the checked boxes, plus the reference's boxes that
tie exactly (a plateau of equal scores, where every runtime picks its own). A box a near-tie changed (a
box kept by the candidate only suppressed it, or pushed it off a full list) is excused with it
(decisions.explain_nms_differences).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tod_deploy.parity.decisions import CASCADE, TIE, explain_nms_differences, selection_floor
from tod_deploy.parity.policy import ParityPolicy
from tod_deploy.parity.report import DetectionAgreement


@dataclass(frozen=True)
class DetectionRule:
    """What the graph's selection does: the score threshold final scores are cut at (None: no cut)
    and the final NMS IoU (None: no NMS)."""

    score_threshold: float
    nms_iou: float | None = None


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / np.maximum(union, 1e-12)
    # Degenerate (zero-area) boxes have no IoU; count them as overlapping exactly when they coincide.
    rows, cols = np.nonzero(union <= 1e-12)
    iou[rows, cols] = np.all(np.abs(a[rows] - b[cols]) <= 1e-3, axis=1)
    return iou


def new_agreement(policy: ParityPolicy, name: str = "detections") -> DetectionAgreement:
    return DetectionAgreement(policy.min_iou, policy.score_tol, policy.max_excused_share, name)


def agree_detections(
    ref: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    rule: DetectionRule,
    into: DetectionAgreement,
    policy: ParityPolicy,
    box_atol: float = 0.0,
) -> None:
    """Match each reference detection of a batch to the candidate's; see the module docstring."""
    for i in range(ref["num_dets"].shape[0]):
        n_ref, n_got = int(ref["num_dets"][i]), int(got["num_dets"][i])
        into.reference += n_ref
        boxes_r, scores_r, labels_r = ref["boxes"][i, :n_ref], ref["scores"][i, :n_ref], ref["labels"][i, :n_ref]
        boxes_g, scores_g, labels_g = got["boxes"][i, :n_got], got["scores"][i, :n_got], got["labels"][i, :n_got]
        # Boxes scoring within the margin of the score threshold may be selected or not by a correct
        # runtime, so only those above it are counted: onnxruntime's Sigmoid gives exactly 0 below -18
        # where PyTorch gives 1e-20, and NMS among a trained RPN's proposals tied at 0 keeps more of them.
        cut = rule.score_threshold + policy.selection_margin
        counted = abs(int(np.count_nonzero(scores_r > cut)) - int(np.count_nonzero(scores_g > cut)))
        into.count_diff = max(into.count_diff, counted)
        if n_ref == 0:
            continue
        floor = selection_floor(scores_r, rule.score_threshold, policy)
        iou = box_iou(boxes_r, boxes_g) if n_got else np.zeros((n_ref, 0))
        paired = np.zeros(n_got, bool)  # candidate boxes some reference box matches
        values, counts = np.unique(scores_r, return_counts=True)
        shared = np.isin(scores_r, values[counts > 1])
        unmatched: dict[int, tuple[float, float]] = {}  # reference index -> (IoU, score diff) of its closest box
        for j in range(n_ref):
            if scores_r[j] <= floor and rule.nms_iou is None:
                continue  # only explaining NMS differences needs the pairs of unchecked boxes
            same = labels_g == labels_r[j]
            near = np.all(np.abs(boxes_g - boxes_r[j]) <= box_atol, axis=1)
            agree = same & ((iou[j] >= into.min_iou_required) | near)
            diffs = np.abs(scores_g - scores_r[j])
            paired |= agree & (diffs <= into.score_tol)
            if scores_r[j] <= floor:
                continue
            into.checked += 1
            into.tied += int(shared[j])
            if not same.any():
                unmatched[j] = (0.0, 0.0)
                continue
            # among candidates with the same box (clipped boxes can coincide), the closest score
            if agree.any():
                k = int(np.argmin(np.where(agree, diffs, np.inf)))
            else:
                k = int(np.argmax(np.where(same, iou[j], -1.0)))
            if agree[k] and diffs[k] <= into.score_tol:
                into.matched += 1
            else:
                unmatched[j] = (float(iou[j, k]), float(diffs[k]))
        explained: dict[int, str] = {}
        if rule.nms_iou is not None and unmatched:
            only_ref = np.array(sorted(unmatched), dtype=np.int64)
            full = n_got == got["scores"].shape[1]  # the candidate kept as many as it can
            explained = explain_nms_differences(
                iou, (scores_r, labels_r), (scores_g, labels_g), only_ref, np.flatnonzero(~paired), rule.nms_iou,
                policy, float(scores_g.min()) if full else None,
            )  # fmt: skip
        for j, (closest_iou, score_diff) in unmatched.items():
            kind = explained.get(j)
            if kind == TIE:
                into.near_ties += 1
            elif kind == CASCADE:
                into.cascaded += 1
            else:
                into.min_iou = min(into.min_iou, closest_iou)
                into.max_score_diff = max(into.max_score_diff, score_diff)
