"""Detections of two runtimes, matched one by one.

Each reference detection clear of a selection boundary (decisions.selection_floor) must have a
candidate with the same label, IoU at least ``min_iou`` (or every coordinate within ``box_atol``
pixels: a box a pixel wide loses 1% IoU to 0.005 px of rounding) and a score within ``score_tol``; among
several such boxes (clipped boxes can coincide), the one closest in score. With NMS in the graph, an
unmatched box that NMS could have decided either way (decisions.nms_near_tie: a near-equal overlapping
rival, or a higher-scoring box overlapping it at the NMS threshold) is an NMS near-tie, counted apart and
excused while rare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tod_deploy.parity.decisions import nms_near_tie, selection_floor
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
    same = np.all(np.abs(a[:, None, :] - b[None, :, :]) <= 1e-3, axis=2)
    return np.where(union <= 1e-12, same.astype(iou.dtype), iou)


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
        into.count_diff = max(into.count_diff, abs(n_ref - n_got))
        if n_ref == 0:
            continue
        boxes_r, scores_r, labels_r = ref["boxes"][i, :n_ref], ref["scores"][i, :n_ref], ref["labels"][i, :n_ref]
        boxes_g, scores_g, labels_g = got["boxes"][i, :n_got], got["scores"][i, :n_got], got["labels"][i, :n_got]
        floor = selection_floor(scores_r, rule.score_threshold, policy)
        iou = box_iou(boxes_r, boxes_g) if n_got else np.zeros((n_ref, 0))
        for j in np.flatnonzero(scores_r > floor):
            into.checked += 1
            same = np.flatnonzero(labels_g == labels_r[j])
            if same.size == 0:
                into.min_iou = 0.0
                continue
            boxes_agree = (iou[j, same] >= into.min_iou_required) | np.all(
                np.abs(boxes_g[same] - boxes_r[j]) <= box_atol, axis=1
            )
            # among candidates with the same box (clipped boxes can coincide), the closest score
            k = same[np.argmin(np.where(boxes_agree, np.abs(scores_g[same] - scores_r[j]), np.inf))]
            if not boxes_agree.any():
                k = same[np.argmax(iou[j, same])]
            diff = abs(float(scores_r[j]) - float(scores_g[k]))
            same_box = bool(boxes_agree[np.flatnonzero(same == k)[0]])
            if same_box and diff <= into.score_tol:
                into.matched += 1
            elif rule.nms_iou is not None and nms_near_tie(
                iou[j, same], scores_g[same], float(scores_r[j]), rule.nms_iou, policy
            ):
                into.near_ties += 1
                continue
            into.min_iou = min(into.min_iou, float(iou[j, k]))
            into.max_score_diff = max(into.max_score_diff, diff)
