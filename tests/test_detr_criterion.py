"""Deformable-DETR's set loss against a NumPy reference written from upstream's ``SetCriterion``
(fundamentalvision/Deformable-DETR, models/deformable_detr.py and models/segmentation.py): the focal
term is ``sigmoid_focal_loss(...).mean(1).sum() / num_boxes * num_queries``, the sum over every query
and class divided by the number of target boxes, weighted 2; L1 (5) and GIoU (2) on the matched pairs."""

from __future__ import annotations

import numpy as np
import torch

from tod_deploy.nn.detr_criterion import SetCriterion


def _focal(logits: np.ndarray, onehot: np.ndarray, alpha: float = 0.25, gamma: float = 2.0) -> np.ndarray:
    prob = 1 / (1 + np.exp(-logits))
    ce = -(onehot * np.log(prob) + (1 - onehot) * np.log(1 - prob))
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    return (alpha * onehot + (1 - alpha) * (1 - onehot)) * ce * (1 - p_t) ** gamma


def _giou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise GIoU of (cx, cy, w, h) boxes."""
    def corners(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x[:, :2] - x[:, 2:] / 2, x[:, :2] + x[:, 2:] / 2], axis=1)

    a, b = corners(a), corners(b)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    inter_wh = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area(a) + area(b) - inter
    hull_wh = np.maximum(a[:, 2:], b[:, 2:]) - np.minimum(a[:, :2], b[:, :2])
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return inter / union - (hull - union) / hull


def _case(queries: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two images, 3 and 2 targets of 2 classes; query i of image b is matched to target i (the matcher is
    fixed in the tests, so the reference needs no Hungarian solver)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, queries, 2, generator=g) * 2
    boxes = torch.rand(2, queries, 2, generator=g) * 0.6 + 0.2
    boxes = torch.cat([boxes, torch.rand(2, queries, 2, generator=g) * 0.2 + 0.05], dim=2)
    targets = [
        {"labels": torch.tensor([0, 1, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.2], [0.6, 0.5, 0.2, 0.1],
                                                                    [0.4, 0.7, 0.15, 0.15]])},
        {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.2, 0.8, 0.1, 0.1]])},
    ]  # fmt: skip
    return logits, boxes, targets


def _reference(logits: np.ndarray, boxes: np.ndarray, targets: list[dict[str, torch.Tensor]]) -> float:
    num_boxes = sum(len(t["labels"]) for t in targets)
    onehot = np.zeros_like(logits)
    src, tgt = [], []
    for b, target in enumerate(targets):
        n = len(target["labels"])
        onehot[b, np.arange(n), target["labels"].numpy()] = 1
        src.append(boxes[b, :n])
        tgt.append(target["boxes"].numpy())
    src, tgt = np.concatenate(src), np.concatenate(tgt)
    cls = _focal(logits, onehot).sum() / num_boxes
    l1 = np.abs(src - tgt).sum() / num_boxes
    giou = (1 - _giou(src, tgt)).sum() / num_boxes
    return 2 * cls + 5 * l1 + 2 * giou


class InOrderMatcher(torch.nn.Module):
    """Query i <-> target i."""

    def forward(self, _logits: torch.Tensor, _boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> list:
        return [(torch.arange(len(t["labels"])), torch.arange(len(t["labels"]))) for t in targets]


def _criterion_matching_in_order() -> SetCriterion:
    criterion = SetCriterion(num_classes=2)
    criterion.matcher = InOrderMatcher()
    return criterion


def test_layer_loss_matches_upstream_scale() -> None:
    logits, boxes, targets = _case(queries=300)
    got = _criterion_matching_in_order().layer_loss(logits, boxes, targets)
    want = _reference(logits.double().numpy(), boxes.double().numpy(), targets)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_class_term_sums_over_queries_not_averages() -> None:
    """Adding unmatched queries adds their focal loss: the class term is not divided by the number of
    queries, so 300 background queries weigh 300 times one (the scale a mean over queries lost)."""
    criterion = _criterion_matching_in_order()
    logits, boxes, targets = _case(queries=300)
    background = torch.full((2, 300, 2), 0.0)  # p = 0.5 on every extra query and class
    more_logits = torch.cat([logits, background], dim=1)
    more_boxes = torch.cat([boxes, boxes], dim=1)
    added = float(criterion.layer_loss(more_logits, more_boxes, targets) - criterion.layer_loss(logits, boxes, targets))
    per_negative = 0.75 * np.log(2) * 0.5**2  # (1 - alpha) * -log(1 - p) * p^gamma at p = 0.5
    np.testing.assert_allclose(added, 2 * (2 * 300 * 2) * per_negative / 5, rtol=1e-5)


def test_matcher_pairs_each_target_with_the_query_that_predicts_it() -> None:
    logits, boxes, targets = _case(queries=20, seed=3)
    for b, target in enumerate(targets):  # plant each target's box, confidently classed, at query 10 + i
        for i, (label, box) in enumerate(zip(target["labels"], target["boxes"], strict=True)):
            boxes[b, 10 + i] = box
            logits[b, 10 + i] = -6.0
            logits[b, 10 + i, label] = 6.0
    matched = SetCriterion(num_classes=2).matcher(logits, boxes, targets)
    for (rows, cols), target in zip(matched, targets, strict=True):
        planted = [(i, 10 + i) for i in range(len(target["labels"]))]
        assert sorted(zip(cols.tolist(), rows.tolist(), strict=True)) == planted
