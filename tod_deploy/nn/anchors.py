"""mmdet's AnchorGenerator and DeltaXYWHBBoxCoder, reproduced number for number.

Anchor order matters for checkpoint compatibility: per location (row-major), then per base
anchor (ratio-major, scale-minor), which is how a head's ``[N, A*k, H, W]`` output flattens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def base_anchors(stride: int, scales: list[float], ratios: list[float]) -> Tensor:
    h_ratios = torch.sqrt(torch.tensor(ratios, dtype=torch.float32))
    w_ratios = 1 / h_ratios
    scales_t = torch.tensor(scales, dtype=torch.float32)
    ws = (stride * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def grid_anchors(feat_hw: tuple[int, int], stride: int, scales: list[float], ratios: list[float]) -> Tensor:
    """[H * W * A, 4] anchors (x1, y1, x2, y2) for one level; a constant at export time."""
    h, w = feat_hw
    shift_x = torch.arange(w, dtype=torch.float32) * stride
    shift_y = torch.arange(h, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], dim=-1)
    return (shifts[:, None, :] + base_anchors(stride, scales, ratios)[None]).reshape(-1, 4)


WH_RATIO_CLIP = 16 / 1000


def decode_deltas(rois: Tensor, deltas: Tensor, stds: tuple[float, ...], image_hw: tuple[int, int] | None) -> Tensor:
    """mmdet ``delta2bbox`` (means 0): deltas scaled by stds, dw/dh clamped, boxes clipped to the image."""
    std = torch.tensor(stds, dtype=deltas.dtype, device=deltas.device)
    d = deltas * std
    max_ratio = abs(math.log(WH_RATIO_CLIP))
    dxy, dwh = d[..., :2], d[..., 2:].clamp(min=-max_ratio, max=max_ratio)
    pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
    pwh = rois[..., 2:] - rois[..., :2]
    gxy = pxy + pwh * dxy
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if image_hw is not None:
        h, w = image_hw
        bound = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), bound)
    return boxes


def encode_deltas(rois: Tensor, gt: Tensor, stds: tuple[float, ...]) -> Tensor:
    """mmdet ``bbox2delta`` (means 0): the regression targets the training losses use."""
    pxy, pwh = (rois[..., :2] + rois[..., 2:]) * 0.5, (rois[..., 2:] - rois[..., :2]).clamp(min=1e-6)
    gxy, gwh = (gt[..., :2] + gt[..., 2:]) * 0.5, (gt[..., 2:] - gt[..., :2]).clamp(min=1e-6)
    deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
    return deltas / torch.tensor(stds, dtype=deltas.dtype, device=deltas.device)
