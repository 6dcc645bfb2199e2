"""mmdet's FCOSHead (keys ``cls_convs.i.conv``, ``cls_convs.i.gn``, ``conv_cls``, ``conv_reg``,
``conv_centerness``, ``scales.i.scale``), with real or 1-bit tower convs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.nn.heads.rpn import flatten_head
from tod_deploy.nn.postprocess import grouped_nms_topk, pad_invalid

TowerConv = Callable[[int, int], nn.Module]


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class TowerBlock(nn.Module):
    """conv -> norm -> activation. Real: GN + ReLU (mmdet's FCOS). 1-bit: BN, the Bi-Real shortcut
    and PReLU - BN rather than GN because it folds into the 1-bit kernel's per-channel epilogue,
    which keeps every head layer exact across runtimes (GN couples a whole map, so a single
    sign flipped by rounding would perturb every value of the next layer) and saves two passes."""

    def __init__(self, channels: int, conv: TowerConv, binary: bool) -> None:
        super().__init__()
        self.binary = binary
        self.conv = conv(channels, channels)
        if binary:
            self.bn = nn.BatchNorm2d(channels)
        else:
            self.gn = nn.GroupNorm(32, channels)
        self.act = nn.PReLU(channels) if binary else nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.binary:
            return self.act(self.bn(self.conv(x)) + x)
        return self.act(self.gn(self.conv(x)))


def real_tower_conv(cin: int, cout: int) -> nn.Module:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class FCOSHead(nn.Module):
    def __init__(
        self, num_classes: int, strides: tuple[int, ...], conv: TowerConv = real_tower_conv, binary: bool = False,
        channels: int = 256, stacked: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.strides = num_classes, strides
        self.cls_convs = nn.ModuleList(TowerBlock(channels, conv, binary) for _ in range(stacked))
        self.reg_convs = nn.ModuleList(TowerBlock(channels, conv, binary) for _ in range(stacked))
        # The last layers stay real-valued in the 1-bit detector too.
        self.conv_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in strides)
        for layer in (self.conv_cls, self.conv_reg, self.conv_centerness):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Concatenated over levels: class logits [N, P, C], distances [N, P, 4] (pixels), centerness [N, P]."""
        cls, reg, ctr = [], [], []
        for level, f in enumerate(feats):
            c, r = f, f
            for block in self.cls_convs:
                c = block(c)
            for block in self.reg_convs:
                r = block(r)
            cls.append(flatten_head(self.conv_cls(c), self.num_classes))
            # norm_on_bbox (mmdet's FCOS configs): ReLU of the scaled output, times the stride.
            reg.append(flatten_head(F.relu(self.scales[level](self.conv_reg(r))) * self.strides[level], 4))
            ctr.append(flatten_head(self.conv_centerness(r), 1).squeeze(-1))  # centerness on the reg branch
        return torch.cat(cls, 1), torch.cat(reg, 1), torch.cat(ctr, 1)


def fcos_points(feats: list[Tensor], strides: tuple[int, ...]) -> list[Tensor]:
    """Point centres per level, (x + 0.5) * stride as mmdet's MlvlPointGenerator puts them."""
    points = []
    for f, s in zip(feats, strides, strict=True):
        h, w = int(f.shape[2]), int(f.shape[3])
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
        )
        points.append(torch.stack([(xs.reshape(-1) + 0.5) * s, (ys.reshape(-1) + 0.5) * s], -1).to(f.device))
    return points


def fcos_detections(
    logits: Tensor, distances: Tensor, centerness: Tensor, points: list[Tensor], image_hw: tuple[int, int],
    nms_pre: int, score_thr: float, iou: float, k: int,
) -> tuple[Tensor, ...]:  # fmt: skip
    """mmdet FCOS test: per level the top ``nms_pre`` (point, class) pairs above ``score_thr``;
    score = class probability x centerness; class-wise NMS; the best ``k``."""
    c = logits.shape[-1]
    sizes = [p.shape[0] for p in points]
    h, w = image_hw
    bound = torch.tensor([w, h, w, h], dtype=logits.dtype, device=logits.device)
    boxes, scores, labels, valid = [], [], [], []
    for lg, dist, ctr, pts in zip(logits.split(sizes, 1), distances.split(sizes, 1), centerness.split(sizes, 1),
                                  points, strict=True):  # fmt: skip
        probs = lg.sigmoid().flatten(1)
        top, idx = probs.topk(min(nms_pre, probs.shape[1]), dim=1)
        point_idx = torch.div(idx, c, rounding_mode="floor")
        d = torch.gather(dist, 1, point_idx[..., None].expand(-1, -1, 4))
        p = pts[point_idx]
        box = torch.cat([p - d[..., :2], p + d[..., 2:]], -1)
        boxes.append(torch.minimum(box.clamp(min=0), bound))
        scores.append(top * torch.gather(ctr.sigmoid(), 1, point_idx))
        labels.append(idx - point_idx * c)
        valid.append(top > score_thr)
    boxes_t, scores_t, labels_t = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)
    top_boxes, top_scores, index, keep = grouped_nms_topk(boxes_t, scores_t, labels_t, torch.cat(valid, 1), iou, k)
    return pad_invalid(top_boxes, top_scores, torch.gather(labels_t, 1, index), keep)
