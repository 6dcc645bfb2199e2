"""Training-only losses of the coarse-to-fine RPN, with CFINet's area-based anchor mining.

Stage 0 assigns anchors with the public code's ``DynamicAssigner``: a ground truth's positive
IoU threshold grows with its size, thr = clamp(0.25 + 0.15 * log2(sqrt(area) / 12), 0.2, 0.7),
so a tiny object, whose anchors can barely overlap it, still gets positives; anchors below
0.15 are negatives, the rest ignored. Stage 1 uses a max-IoU assigner (0.7 / 0.7, low-quality
matches at 0.3) and samples 256 anchors, half positive at most. Both regress decoded boxes with a
linear IoU loss (``IoULoss(linear=True)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from tod_deploy.nn.anchors import decode_deltas
from tod_deploy.nn.heads.crpn import STAGE0_STDS, STAGE1_STDS, CRPNOutputs
from tod_deploy.nn.heads.losses import IGNORE, NEGATIVE, RPN_SAMPLER, assign_max_iou, random_sample

LOW_QUALITY_IOU, BASE_POS_IOU, NORMAL_IOU, AREA_SLOPE, BASE_SIZE = 0.2, 0.25, 0.7, 0.15, 12.0
STAGE0_NEG_IOU = 0.15
REFINE_REG_FACTOR = 200.0  # stage 0 averages its loss over anchors / 200 (guided anchoring's constant)
RPN_WEIGHT = 0.9


def positive_iou_thresholds(gt_boxes: Tensor) -> Tensor:
    """Per ground truth: the IoU an anchor needs to be its positive (larger objects need more)."""
    side = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])).clamp(min=1e-6).sqrt()
    return (BASE_POS_IOU + AREA_SLOPE * torch.log2(side / BASE_SIZE)).clamp(min=LOW_QUALITY_IOU, max=NORMAL_IOU)


def assign_by_area(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """Per anchor: its ground truth index, NEGATIVE or IGNORE (the public DynamicAssigner)."""
    assigned = torch.full((anchors.shape[0],), IGNORE, dtype=torch.long, device=anchors.device)
    if gt_boxes.numel() == 0:
        return assigned.fill_(NEGATIVE)
    best, best_gt = box_iou(anchors, gt_boxes).max(dim=1)
    positive = best >= positive_iou_thresholds(gt_boxes)[best_gt]
    assigned[positive] = best_gt[positive]
    assigned[best < STAGE0_NEG_IOU] = NEGATIVE
    return assigned


def linear_iou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Sum of 1 - IoU over paired boxes."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(dim=1) + (target[:, 2:] - target[:, :2]).prod(dim=1)
    iou = inter / (union - inter).clamp(min=1e-6)
    return (1 - iou).sum()


def crpn_losses(out: CRPNOutputs, targets: list[dict[str, Tensor]], average_anchors: int) -> dict[str, Tensor]:
    """Stage 0's IoU loss is summed over its positives and divided by ``average_anchors / 200`` (mmdet's
    Cascade RPN without sampling: the image's anchor count). Objects of a given pixel size get as many
    positives in a small image as in a large one, so that term weighs more the smaller the image: at
    128x128 ninety times what it weighs at upstream's 1216x1216, where it was tuned."""
    anchors = torch.cat(out.anchors)
    reg0, reg1, cls0 = [], [], []
    for i, target in enumerate(targets):
        gt = target["boxes"]
        refined = out.refined[i]
        # stage 0: area-based mining on the fixed anchors, loss on the decoded boxes
        a0 = assign_by_area(anchors, gt)
        pos0 = a0 >= 0
        boxes0 = decode_deltas(anchors[pos0], out.refine_deltas[i][pos0], STAGE0_STDS, None)
        reg0.append(linear_iou_loss(boxes0, gt[a0[pos0]]) / (average_anchors / REFINE_REG_FACTOR))
        # stage 1: max-IoU on the refined anchors, objectness + IoU loss
        a1 = assign_max_iou(refined.detach(), gt, 0.7, 0.7, 0.3)
        used = random_sample(a1, *RPN_SAMPLER)  # the public config's stage-1 RandomSampler(256, 0.5)
        pos1 = used & (a1 >= 0)
        labels = pos1.to(out.objectness.dtype)
        avg = max(int(used.sum()), 1)
        cls0.append(F.binary_cross_entropy_with_logits(out.objectness[i][used], labels[used], reduction="sum") / avg)
        boxes1 = decode_deltas(refined[pos1].detach(), out.deltas[i][pos1], STAGE1_STDS, None)
        reg1.append(linear_iou_loss(boxes1, gt[a1[pos1]]) / avg)
    return {
        "s0.loss_rpn_reg": 10.0 * RPN_WEIGHT * torch.stack(reg0).mean(),
        "s1.loss_rpn_cls": RPN_WEIGHT * torch.stack(cls0).mean(),
        "s1.loss_rpn_reg": 10.0 * RPN_WEIGHT * torch.stack(reg1).mean(),
    }
