"""Training losses of the mmdet-style heads: max-IoU assignment, mmdet's random sampling of the
RPN's anchors and the R-CNN's proposals, objectness / focal / CE, L1.

The sampling is what mmdet's Faster R-CNN configs train with (RPN: 256 anchors, half positive at
most; R-CNN: 512 proposals, a quarter positive at most), so that the training form optimizes what
upstream's does. Without it, a tiny-object image's few dozen positive anchors were averaged with
thousands of negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, sigmoid_focal_loss

from tod_deploy.nn.anchors import encode_deltas

NEGATIVE, IGNORE = -1, -2


def assign_max_iou(boxes: Tensor, gt: Tensor, pos_thr: float, neg_thr: float, min_pos_iou: float | None) -> Tensor:
    """Per box: index of its ground truth (>= 0), NEGATIVE, or IGNORE - mmdet's MaxIoUAssigner."""
    assigned = torch.full((boxes.shape[0],), IGNORE, dtype=torch.long, device=boxes.device)
    if gt.numel() == 0:
        return assigned.fill_(NEGATIVE)
    iou = box_iou(boxes, gt)
    best, best_gt = iou.max(dim=1)
    assigned[best < neg_thr] = NEGATIVE
    assigned[best >= pos_thr] = best_gt[best >= pos_thr]
    if min_pos_iou is not None:  # match_low_quality: every gt keeps its best box
        gt_best, gt_box = iou.max(dim=0)
        for g in range(gt.shape[0]):
            if gt_best[g] >= min_pos_iou:
                assigned[gt_box[g]] = g
    return assigned


RPN_SAMPLER, RCNN_SAMPLER = (256, 0.5), (512, 0.25)  # mmdet's RandomSampler(num, pos_fraction)


def random_sample(assigned: Tensor, num: int, pos_fraction: float) -> Tensor:
    """mmdet's RandomSampler as a mask: up to ``num * pos_fraction`` positives, negatives for the rest
    of ``num``, each drawn at random (torch's generator); everything else is left out of the loss."""
    pos = (assigned >= 0).nonzero().squeeze(1)
    neg = (assigned == NEGATIVE).nonzero().squeeze(1)
    pos = pos[torch.randperm(pos.numel(), device=pos.device)[: int(num * pos_fraction)]]
    neg = neg[torch.randperm(neg.numel(), device=neg.device)[: num - pos.numel()]]
    keep = torch.zeros_like(assigned, dtype=torch.bool)
    keep[pos] = True
    keep[neg] = True
    return keep


def dense_loss(
    logits: Tensor, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None,
    pos_thr: float, neg_thr: float, min_pos_iou: float | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One image of an anchor head: logits [A, C] (C = 1 for RPN objectness), deltas [A, 4].
    The RPN (``gt_labels`` None) learns from a random sample of anchors, both its losses averaged over
    the sample (mmdet's AnchorHead with sampling); RetinaNet's focal loss from all, averaged over the
    positives."""
    assigned = assign_max_iou(anchors, gt_boxes, pos_thr, neg_thr, min_pos_iou)
    used = random_sample(assigned, *RPN_SAMPLER) if gt_labels is None else assigned != IGNORE
    pos = used & (assigned >= 0)
    target = torch.zeros_like(logits)
    if pos.any():
        cls_index = gt_labels[assigned[pos]] if gt_labels is not None else torch.zeros_like(assigned[pos])
        target[pos.nonzero().squeeze(1), cls_index] = 1.0
    if gt_labels is None:
        average = max(int(used.sum()), 1)
        cls = F.binary_cross_entropy_with_logits(logits[used], target[used], reduction="sum") / average
    else:
        average = max(int(pos.sum()), 1)
        cls = sigmoid_focal_loss(logits[used], target[used], reduction="sum") / average
    reg = deltas.sum() * 0.0
    if pos.any():
        reg = (deltas[pos] - encode_deltas(anchors[pos], gt_boxes[assigned[pos]], (1.0, 1.0, 1.0, 1.0))).abs().sum()
        reg = reg / average
    return cls, reg


def roi_loss(
    logits: Tensor, deltas: Tensor, rois: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int,
    stds: tuple[float, ...], iou_thr: float, class_agnostic: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One image of a box head: logits [P, C + 1] (background last), deltas [P, 4C or 4], on a random
    sample of the proposals (ground truths included, as mmdet appends them). Both losses are averaged
    over the sample, as mmdet's BBoxHead.loss (``avg_factor=bbox_targets.size(0)``)."""
    assigned = assign_max_iou(rois, gt_boxes, iou_thr, iou_thr, None)
    used = random_sample(assigned, *RCNN_SAMPLER)
    pos = used & (assigned >= 0)
    labels = torch.full_like(assigned, num_classes)
    labels[pos] = gt_labels[assigned[pos]]
    cls = F.cross_entropy(logits[used], labels[used])
    reg = deltas.sum() * 0.0
    if pos.any():
        d = deltas[pos].view(-1, 1 if class_agnostic else num_classes, 4)
        d = d[:, 0] if class_agnostic else d[torch.arange(d.shape[0]), labels[pos]]
        reg = (d - encode_deltas(rois[pos], gt_boxes[assigned[pos]], stds)).abs().sum() / max(int(used.sum()), 1)
    return cls, reg
