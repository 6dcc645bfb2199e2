"""Detection ops written so that ``torch.onnx.export`` maps them onto standard ONNX ops.

Multi-scale deformable attention is the pure-PyTorch form of Deformable-DETR
(``ms_deform_attn_core_pytorch``): one ``grid_sample`` per level with
``align_corners=False``. It exports to ONNX ``GridSample`` which onnxruntime and TensorRT run
unmodified, so no custom op is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_grids: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample each level bilinearly and sum the samples weighted by attention.

    The weighted sum runs level by level rather than over upstream's stack of all levels: the stack is a
    Concat of every sample (5.8M values per attention layer in ThumbDet 4x at 800x1333), which cost
    onnxruntime 20 ms of its 230 on 2 cores and cannot fuse away (measured: 244.6 -> 230.4 ms, Xeon).
    The points lie on the grid's first spatial axis, so the sum over them reduces a middle axis with the
    queries contiguous, not a last axis of 4 (onnxruntime's ReduceSums there: 12.2 -> 4.3 ms; model
    226.9 -> 220.5 ms).

    value: [N, S, M, D]; sampling_grids: [N, Lq, M, L, P, 2] in grid_sample's frame, -1..1 across the map
    (x, y), which is upstream's sampling locations (0..1) times 2 minus 1: the caller folds that into its
    offset projection (``MSDeformAttn``); attention_weights: [N, Lq, M, L, P]. Returns [N, Lq, M * D].
    """
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_grids.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid_l = sampling_grids[:, :, :, level].permute(0, 2, 3, 1, 4).flatten(0, 1)  # [N*M, P, Lq, 2]
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(n * m, 1, levels, points, lq)
    out = sum((s * weights[:, :, level]).sum(2) for level, s in enumerate(sampled)).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
