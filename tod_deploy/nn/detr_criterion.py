"""Deformable-DETR's training loss: Hungarian matching, sigmoid focal loss, L1 and GIoU.

Training-only: it lives in the training form so that one optimization step can be run and
checked; nothing here is reachable from a deploy module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from tod_deploy.nn.ops import box_cxcywh_to_xyxy


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        from scipy.optimize import linear_sum_assignment  # training-only dependency

        out = []
        for b, target in enumerate(targets):
            prob = logits[b].sigmoid()
            tgt_ids, tgt_boxes = target["labels"], target["boxes"]
            if len(tgt_ids) == 0:
                out.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            alpha, gamma = 0.25, 2.0
            neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
            pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
            cost = (
                self.cost_class * (pos[:, tgt_ids] - neg[:, tgt_ids])
                + self.cost_bbox * torch.cdist(boxes[b], tgt_boxes, p=1)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes[b]), box_cxcywh_to_xyxy(tgt_boxes))
            )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out


class SetCriterion(nn.Module):
    """Focal (weight 2), L1 (5) and GIoU (2) losses summed over every decoder layer, each divided by the
    batch's number of target boxes, as Deformable-DETR's ``SetCriterion`` (models/deformable_detr.py)."""

    def __init__(self, num_classes: int, weights: tuple[float, float, float] = (2.0, 5.0, 2.0)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = HungarianMatcher()
        self.w_cls, self.w_l1, self.w_giou = weights

    def layer_loss(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        indices = self.matcher(logits, boxes, targets)
        num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
        onehot = torch.zeros_like(logits)
        src_boxes, tgt_boxes = [], []
        for b, (rows, cols) in enumerate(indices):
            onehot[b, rows, targets[b]["labels"][cols]] = 1.0
            src_boxes.append(boxes[b, rows])
            tgt_boxes.append(targets[b]["boxes"][cols])
        # Upstream's loss_labels: sigmoid_focal_loss(...).mean(1).sum() / num_boxes * num_queries, i.e. the sum
        # over every query and class. Without the * num_queries the class term is 300x too weak beside the box
        # terms, and a trained model's scores crowd together (ThumbDet's did, at 0.2-0.3, for 15000 steps).
        cls = sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_boxes
        src, tgt = torch.cat(src_boxes), torch.cat(tgt_boxes)
        l1 = (src - tgt).abs().sum() / num_boxes
        giou = (1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))).sum() / num_boxes
        return self.w_cls * cls + self.w_l1 * l1 + self.w_giou * giou

    def forward(self, layers: list[tuple[Tensor, Tensor]], targets: list[dict[str, Tensor]]) -> Tensor:
        return sum((self.layer_loss(logits, boxes, targets) for logits, boxes in layers), torch.zeros(()))
