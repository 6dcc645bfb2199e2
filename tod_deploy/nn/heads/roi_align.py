"""torchvision's RoIAlign (mmdet's settings: ``aligned=True``, adaptive sampling) with a backward made of
two matrix products, for training two-stage detectors on the CPU.

torchvision's CPU backward scatters every bilinear sample of every bin of every RoI into the feature
gradient, one channel at a time, on one thread: 1.74 s of a 4.6 s SR-TOD training step (128x128,
batch 4, 2 threads). RoIAlign is separable, though. A bin's value is the mean of its bilinear samples,
and each sample's weight is a row weight times a column weight (the validity test, the clamping at
the border and ``1 / count`` too split per axis). So the pooled map of RoI ``r`` is ``A_r F B_r^T``,
with ``A_r`` [P, H] and ``B_r`` [P, W] holding each output row's (column's) weights on the feature's
rows (columns). The gradient of ``F`` is then ``sum_r A_r^T G_r B_r``: a batched product and one large
one, both run by the BLAS on every thread. torchvision has no such path, hence this module.

The forward is torchvision's own, so values stay bit-identical to the exported RoiAlign's reference.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align


def axis_weights(low: Tensor, high: Tensor, spatial_scale: float, pooled: int, size: int) -> Tensor:
    """[R, pooled, size]: how much each output row (or column) of each RoI takes from each feature row
    (column), as torchvision's CPU kernel samples it: ``ceil(extent / pooled)`` samples per bin, a sample
    outside ``[-1, size]`` dropped, one inside clamped to the border, bilinear weights, the bin's mean."""
    start = low * spatial_scale - 0.5
    extent = (high * spatial_scale - 0.5) - start
    bin_size = extent / pooled
    samples = torch.ceil(extent / pooled).clamp(min=0)  # a negative extent samples nothing, as upstream's loop
    most = max(int(samples.max()), 1) if samples.numel() else 1
    step = torch.arange(most, dtype=low.dtype, device=low.device)
    bins = torch.arange(pooled, dtype=low.dtype, device=low.device)
    per_sample = (bin_size / samples.clamp(min=1))[:, None, None]
    at = start[:, None, None] + bins[None, :, None] * bin_size[:, None, None] + (step + 0.5) * per_sample
    used = (step < samples[:, None, None]) & (at >= -1.0) & (at <= size)
    at = at.clamp(min=0.0)
    lower = at.floor().clamp(max=size - 1)
    at = torch.where(lower >= size - 1, lower, at)
    upper = torch.where(lower >= size - 1, lower, lower + 1)
    frac = at - lower
    share = used / samples.clamp(min=1)[:, None, None]
    weights = low.new_zeros(low.shape[0], pooled, size)
    index = torch.cat([lower, upper], 2).long()
    weights.scatter_add_(2, index, torch.cat([(1 - frac) * share, frac * share], 2))
    return weights


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: Tensor, rois: Tensor, pooled: int, spatial_scale: float) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(rois)
        ctx.feats_shape, ctx.pooled, ctx.spatial_scale = feats.shape, pooled, spatial_scale
        return roi_align(feats, rois, pooled, spatial_scale=spatial_scale, sampling_ratio=0, aligned=True)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: ANN001
        (rois,) = ctx.saved_tensors
        n, c, h, w = ctx.feats_shape
        p, scale = ctx.pooled, ctx.spatial_scale
        rows = axis_weights(rois[:, 2], rois[:, 4], scale, p, h).to(grad.dtype)  # [R, P, H]
        cols = axis_weights(rois[:, 1], rois[:, 3], scale, p, w).to(grad.dtype)  # [R, P, W]
        # G_r B_r, laid out [R, P(rows) x C, W] so that the sum over RoIs and rows is one product per image
        spread = torch.bmm(grad.permute(0, 2, 1, 3).reshape(-1, p * c, p), cols)
        if n == 1:  # a training step pools image by image: no copies of its RoIs
            out = (rows.reshape(-1, h).t() @ spread.view(-1, c * w))[None]
        else:
            out = grad.new_zeros(n, h, c * w)
            image = rois[:, 0].long()
            for i in image.unique().tolist():
                mine = (image == i).nonzero().squeeze(1)
                out[i] = rows[mine].reshape(-1, h).t() @ spread[mine].view(-1, c * w)
        return out.view(n, h, c, w).permute(0, 2, 1, 3).contiguous(), None, None, None


def roi_align_mmdet(feats: Tensor, rois: Tensor, pooled: int, spatial_scale: float) -> Tensor:
    """RoIAlign as mmdet's extractor runs it (``aligned=True``, ``sampling_ratio=0``); see the module."""
    return _RoIAlign.apply(feats, rois, pooled, spatial_scale)
