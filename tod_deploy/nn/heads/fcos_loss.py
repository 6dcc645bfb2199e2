"""FCOS training loss (training-only): point assignment by box and scale range, focal, GIoU,
centerness BCE - enough for a real optimization step of the training form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

INF = 1e8
REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


def fcos_targets(points: list[Tensor], boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per point: class index (-1 background) and the (l, t, r, b) distances to its box."""
    pts = torch.cat(points)
    ranges = torch.cat([torch.tensor(r, dtype=pts.dtype).expand(p.shape[0], 2) for p, r in
                        zip(points, REGRESS_RANGES, strict=False)])  # fmt: skip
    if boxes.numel() == 0:
        return torch.full((pts.shape[0],), -1, dtype=torch.long), torch.zeros(pts.shape[0], 4)
    x, y = pts[:, 0:1], pts[:, 1:2]
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)  # [P, G, 4]
    inside = ltrb.min(-1).values > 0
    reach = ltrb.max(-1).values
    in_range = (reach >= ranges[:, :1]) & (reach <= ranges[:, 1:])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand_as(inside).clone()
    area[~(inside & in_range)] = INF
    best_area, best = area.min(dim=1)
    cls = labels[best].clone()
    cls[best_area == INF] = -1
    return cls, ltrb[torch.arange(pts.shape[0]), best]


def fcos_loss(
    logits: Tensor, distances: Tensor, centerness: Tensor, points: list[Tensor], targets: list[dict[str, Tensor]]
) -> dict[str, Tensor]:
    pts = torch.cat(points)
    cls_losses, box_losses, ctr_losses = [], [], []
    for i, t in enumerate(targets):
        cls, ltrb = fcos_targets(points, t["boxes"], t["labels"])
        onehot = torch.zeros_like(logits[i])
        pos = cls >= 0
        onehot[pos, cls[pos]] = 1.0
        num_pos = max(int(pos.sum()), 1)
        cls_losses.append(sigmoid_focal_loss(logits[i], onehot, reduction="sum") / num_pos)
        if not pos.any():
            box_losses.append(distances[i].sum() * 0.0)
            ctr_losses.append(centerness[i].sum() * 0.0)
            continue
        lr, tb = ltrb[pos][:, [0, 2]], ltrb[pos][:, [1, 3]]
        target_ctr = torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))
        p = pts[pos]
        pred = torch.cat([p - distances[i][pos][:, :2], p + distances[i][pos][:, 2:]], -1)
        gt = torch.cat([p - ltrb[pos][:, :2], p + ltrb[pos][:, 2:]], -1)
        box_losses.append((generalized_box_iou_loss(pred, gt, reduction="none") * target_ctr).sum() / target_ctr.sum())
        ctr_losses.append(F.binary_cross_entropy_with_logits(centerness[i][pos], target_ctr))
    return {
        "loss_cls": torch.stack(cls_losses).mean(),
        "loss_bbox": torch.stack(box_losses).mean(),
        "loss_centerness": torch.stack(ctr_losses).mean(),
    }
