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
    return pad_invalid(boxes, scores, labels, scores > score_threshold)


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


def grouped_nms_topk(
    boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, iou_threshold: float, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NMS within each (image, group) and the k best survivors per image, as fixed-size tensors.

    boxes [N, M, 4], scores [N, M] (>= 0), groups [N, M] (class or level ids), valid [N, M].
    One NMS call covers the whole batch: boxes are shifted apart per (image, group), mmdet's
    ``batched_nms`` trick, so the graph has no per-image loop and the batch axis can stay dynamic.
    Invalid entries get score -1: they sort last, so they can never suppress a valid box.
    Returns boxes [N, k, 4], scores [N, k], index into M [N, k], and which of the k are kept.
    """
    from torchvision.ops import nms

    n, m = scores.shape
    masked = torch.where(valid, scores, torch.full_like(scores, -1.0))
    image_ids = torch.arange(n, device=boxes.device).view(n, 1).expand(n, m)
    group_count = groups.max().detach() + 1
    offsets = (image_ids * group_count + groups).to(boxes.dtype) * (boxes.max().detach() + 1)
    keep = nms((boxes + offsets[..., None]).reshape(-1, 4), masked.reshape(-1), iou_threshold)
    kept = torch.zeros(n * m, dtype=torch.bool, device=boxes.device).scatter(0, keep, True).view(n, m)
    ranked = torch.where(kept & valid, scores, torch.full_like(scores, -1.0))
    top_scores, index = ranked.topk(min(k, m), dim=1)
    top_boxes = torch.gather(boxes, 1, index[..., None].expand(-1, -1, 4))
    return top_boxes, top_scores, index, top_scores >= 0


def pad_invalid(boxes: Tensor, scores: Tensor, labels: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The contract from NMS survivors: ``keep`` (a prefix of each row) says which rows are real."""
    num_dets = keep.sum(dim=1).to(torch.int32)
    boxes = torch.where(keep[..., None], boxes, torch.zeros_like(boxes))
    scores = torch.where(keep, scores, torch.zeros_like(scores))
    labels = torch.where(keep, labels, torch.zeros_like(labels)).to(torch.int32)
    return num_dets, boxes, scores, labels
