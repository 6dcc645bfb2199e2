"""mmdet's RPNHead and its proposal step, batch-generic and exportable to plain ONNX."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.nn.anchors import decode_deltas, grid_anchors
from tod_deploy.nn.postprocess import grouped_nms_topk


@dataclass(frozen=True)
class AnchorConfig:
    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    scales: tuple[float, ...] = (8.0,)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    @property
    def per_location(self) -> int:
        return len(self.scales) * len(self.ratios)


@dataclass(frozen=True)
class ProposalConfig:
    nms_pre: int = 1000
    max_per_img: int = 1000
    iou_threshold: float = 0.7
    min_bbox_size: float = 0.0


def level_anchors(feats: list[Tensor], anchors: AnchorConfig) -> list[Tensor]:
    return [
        grid_anchors((int(f.shape[2]), int(f.shape[3])), s, list(anchors.scales), list(anchors.ratios)).to(f.device)
        for f, s in zip(feats, anchors.strides, strict=True)
    ]


def flatten_head(x: Tensor, per_anchor: int) -> Tensor:
    """[N, A*k, H, W] -> [N, H*W*A, k], the order anchors are generated in."""
    n = x.shape[0]
    return x.permute(0, 2, 3, 1).reshape(n, -1, per_anchor)


class SelectedProposals(nn.Module):
    """The proposals a top-k + NMS selection kept (boxes [N, P, 4], scores [N, P], -1 where empty), unchanged.

    A marker with no tensors (state dicts stay as upstream writes them): parity (parity/forcing.py)
    finds it, compares the two runtimes' selections by their margin (a proposal whose score ties the
    last kept one or an overlapping rival may go either way) and continues with the backend's, so a
    near-tie picked differently cannot fail the RoI head's every later output.
    """

    names = ("proposals", "proposal_scores")  # the tensors' names in an export

    def forward(self, boxes: Tensor, scores: Tensor, nms_iou: float) -> tuple[Tensor, Tensor]:  # noqa: ARG002
        return boxes, scores


class RPNHead(nn.Module):
    def __init__(self, in_channels: int = 256, anchors: AnchorConfig = AnchorConfig()) -> None:
        super().__init__()
        self.anchors = anchors
        self.selected = SelectedProposals()
        a = anchors.per_location
        self.rpn_conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(in_channels, a, 1)
        self.rpn_reg = nn.Conv2d(in_channels, a * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls, reg = [], []
        for f in feats:
            x = F.relu(self.rpn_conv(f))
            cls.append(self.rpn_cls(x))
            reg.append(self.rpn_reg(x))
        return cls, reg

    def flat(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Objectness logits [N, A_all] and deltas [N, A_all, 4], levels concatenated in order."""
        cls, reg = self(feats)
        return torch.cat([flatten_head(c, 1).squeeze(-1) for c in cls], 1), torch.cat(
            [flatten_head(r, 4) for r in reg], 1
        )


def objectness_scores(logits: Tensor) -> Tensor:
    """sigmoid(logits), exported so that onnxruntime keeps the tail: its ``Sigmoid`` has an absolute error
    near 3e-8 and returns exactly 0 below a logit of about -17, where a trained RPN puts hundreds of anchors
    (a 128x128 image: 637 of its 3000 proposals at 0, 50-77 on each of the next few steps). The top-k and
    NMS among those ties then keep other proposals than PyTorch's, the RoI head scores them, and torch
    and onnxruntime ended 0.5 AP50 apart on a trained SR-TOD. ``exp(-|x|)`` keeps its relative precision
    down to a logit of -87 in both runtimes, so each side ranks the same proposals."""
    small = torch.exp(-logits.abs())
    return torch.where(logits >= 0, 1.0 / (1.0 + small), small / (1.0 + small))


def propose(
    objectness: Tensor, deltas: Tensor, anchors: list[Tensor], image_hw: tuple[int, int], cfg: ProposalConfig,
    stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Per level: top ``nms_pre`` by objectness, decode, clip; then NMS per level and keep
    ``max_per_img``. Takes the concatenated head outputs (so they are tensors of the graph that
    parity can check) and returns boxes [N, P, 4], scores [N, P] and validity [N, P]. Anchors are
    per level [A, 4], or [N, A, 4] when a previous stage refined them per image."""
    sizes = [a.shape[-2] for a in anchors]
    boxes, scores, levels = [], [], []
    for level, (o, d, a) in enumerate(zip(objectness.split(sizes, 1), deltas.split(sizes, 1), anchors, strict=True)):
        s = objectness_scores(o)
        k = min(cfg.nms_pre, s.shape[1])
        top, idx = s.topk(k, dim=1)
        gather4 = idx[..., None].expand(-1, -1, 4)
        picked = a[idx] if a.dim() == 2 else torch.gather(a, 1, gather4)
        boxes.append(decode_deltas(picked, torch.gather(d, 1, gather4), stds, image_hw))
        scores.append(top)
        levels.append(torch.full_like(idx, level))
    boxes_t, scores_t, levels_t = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(levels, 1)
    wh = boxes_t[..., 2:] - boxes_t[..., :2]
    valid = (wh > cfg.min_bbox_size).all(dim=-1)
    out_boxes, out_scores, _, keep = grouped_nms_topk(
        boxes_t, scores_t, levels_t, valid, cfg.iou_threshold, cfg.max_per_img
    )
    return out_boxes, out_scores, keep
