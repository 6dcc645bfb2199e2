"""mmdet's RetinaHead (keys ``bbox_head.cls_convs.i.conv.*``, ``retina_cls``, ``retina_reg``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.nn.anchors import decode_deltas
from tod_deploy.nn.heads.rpn import AnchorConfig, flatten_head, level_anchors
from tod_deploy.nn.necks.fpn import ConvModule
from tod_deploy.nn.postprocess import grouped_nms_topk, pad_past_threshold


def retina_anchors(octave_base_scale: float = 4.0, scales_per_octave: int = 3) -> AnchorConfig:
    scales = tuple(octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave))
    return AnchorConfig(strides=(8, 16, 32, 64, 128), scales=scales, ratios=(0.5, 1.0, 2.0))


class RetinaHead(nn.Module):
    """``tower`` builds one tower block that carries its own activation (e.g. a 1-bit block);
    by default mmdet's ConvModule + ReLU."""

    def __init__(
        self, num_classes: int, anchors: AnchorConfig, in_channels: int = 256, stacked: int = 4,
        tower: Callable[[], nn.Module] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.anchors = num_classes, anchors
        a = anchors.per_location
        self.activate = tower is None
        make = tower or (lambda: ConvModule(in_channels, in_channels, 3, padding=1))
        self.cls_convs = nn.ModuleList(make() for _ in range(stacked))
        self.reg_convs = nn.ModuleList(make() for _ in range(stacked))
        self.retina_cls = nn.Conv2d(in_channels, a * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(in_channels, a * 4, 3, padding=1)
        towers = [c.conv for c in (*self.cls_convs, *self.reg_convs) if isinstance(c, ConvModule)]
        for conv in (*towers, self.retina_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.retina_cls.weight, std=0.01)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls, reg = [], []
        for f in feats:
            c, r = f, f
            for conv in self.cls_convs:
                c = F.relu(conv(c)) if self.activate else conv(c)
            for conv in self.reg_convs:
                r = F.relu(conv(r)) if self.activate else conv(r)
            cls.append(self.retina_cls(c))
            reg.append(self.retina_reg(r))
        return cls, reg

    def predict(
        self, feats: list[Tensor], image_hw: tuple[int, int], nms_pre: int, score_thr: float, iou: float, k: int
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor]]:
        """mmdet: per level the top ``nms_pre`` (anchor, class) pairs above ``score_thr``, decoded;
        then class-wise NMS and the best ``k``. Raw outputs: all logits and deltas, levels concatenated."""
        cls, reg = self(feats)
        c = self.num_classes
        all_logits = torch.cat([flatten_head(x, c) for x in cls], 1)
        all_deltas = torch.cat([flatten_head(x, 4) for x in reg], 1)
        anchors_per_level = level_anchors(feats, self.anchors)
        sizes = [a.shape[0] for a in anchors_per_level]
        boxes, scores, labels = [], [], []
        for logits, d, anchors in zip(
            all_logits.split(sizes, 1), all_deltas.split(sizes, 1), anchors_per_level, strict=True
        ):
            s = logits.sigmoid().flatten(1)
            top, idx = s.topk(min(nms_pre, s.shape[1]), dim=1)
            anchor_idx = torch.div(idx, c, rounding_mode="floor")
            picked = torch.gather(d, 1, anchor_idx[..., None].expand(-1, -1, 4))
            boxes.append(decode_deltas(anchors[anchor_idx], picked, (1.0, 1.0, 1.0, 1.0), image_hw))
            scores.append(top)
            labels.append(idx - anchor_idx * c)
        boxes_t, scores_t, labels_t = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)
        top_boxes, top_scores, index, keep = grouped_nms_topk(boxes_t, scores_t, labels_t, scores_t > score_thr, iou, k)
        top_labels = torch.gather(labels_t, 1, index)
        top_scores = torch.where(keep, top_scores, torch.zeros_like(top_scores))
        return pad_past_threshold(top_boxes, top_scores, top_labels, score_thr), (all_logits, all_deltas)
