"""Turn head outputs into the fixed-size detection contract (DESIGN.md section 4).

``num_dets`` int32 [N], ``boxes`` float32 [N, K, 4] (x1, y1, x2, y2 in input pixels),
``scores`` float32 [N, K], ``labels`` int32 [N, K]; rows past ``num_dets`` are zero. Written
with ops that export to plain ONNX (TopK, Gather, Where) so every runtime post-processes alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tod_deploy.nn.ops import box_cxcywh_to_xyxy

CONTRACT_OUTPUTS = ("num_dets", "boxes", "scores", "labels")


def pad_past_threshold(
    boxes: Tensor, scores: Tensor, labels: Tensor, score_threshold: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero every row whose score is not above the threshold; scores must be sorted descending."""
    keep = scores > score_threshold
    num_dets = keep.sum(dim=1).to(torch.int32)
    boxes = torch.where(keep[..., None], boxes, torch.zeros_like(boxes))
    scores = torch.where(keep, scores, torch.zeros_like(scores))
    labels = torch.where(keep, labels, torch.zeros_like(labels)).to(torch.int32)
    return num_dets, boxes, scores, labels


def detr_topk(
    logits: Tensor, boxes_cxcywh: Tensor, image_hw: tuple[int, int], top_k: int, score_threshold: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Deformable-DETR's PostProcess: sigmoid, top-k over queries x classes, no NMS."""
    n, _, num_classes = logits.shape
    scores, index = logits.sigmoid().flatten(1).topk(top_k, dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    labels = index - query * num_classes
    h, w = image_hw
    scale = torch.tensor([w, h, w, h], dtype=boxes_cxcywh.dtype, device=boxes_cxcywh.device)
    boxes = box_cxcywh_to_xyxy(boxes_cxcywh) * scale
    boxes = torch.gather(boxes, 1, query[..., None].expand(n, top_k, 4))
    return pad_past_threshold(boxes, scores, labels, score_threshold)
