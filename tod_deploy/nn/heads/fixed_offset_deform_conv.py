"""torchvision's 3x3 deformable conv at offsets that take no gradient (the coarse-to-fine RPN computes
them from stage 0's boxes), with a backward built from ``grid_sample`` and two products, for training.

torchvision's CPU backward also differentiates the offsets, tap by tap and channel by channel, on one
thread: 1.46 s of a 4.8 s CFINet training step (128x128, batch 4, 2 threads), for a gradient nobody
reads. Here the backward re-samples the nine taps with ``grid_sample`` (the same bilinear rule:
a sample at or past one pixel outside the map is zero, a corner outside it counts zero), then the
weight's gradient and the taps' gradient are matrix products, and ``grid_sample``'s own backward
(vectorized, parallel over images) returns the taps' gradient to the feature map.

The forward is torchvision's, so values stay bit-identical to the exported DeformConv's reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d


def sampled_taps(x: Tensor, offsets: Tensor) -> Tensor:
    """[N, C, 9, H, W]: the 3x3 kernel's taps (stride 1, padding 1) of every output, moved by ``offsets``
    [N, 18, H, W] ((dy, dx) per tap, row-major taps), bilinearly sampled as deformable conv samples them."""
    n, c, h, w = x.shape
    taps = torch.arange(-1.0, 2.0, dtype=x.dtype, device=x.device)
    rows = torch.arange(h, dtype=x.dtype, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, 1, w)
    dy, dx = offsets.view(n, 9, 2, h, w).unbind(2)
    y = rows + taps.repeat_interleave(3).view(1, 9, 1, 1) + dy
    xx = cols + taps.repeat(3).view(1, 9, 1, 1) + dx
    # grid_sample's align_corners=False coordinates of pixel centres: (2 p + 1) / size - 1
    grid = torch.stack([(2 * xx + 1) / w - 1, (2 * y + 1) / h - 1], -1).view(n, 9 * h, w, 2)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.view(n, c, 9, h, w)


class _FixedOffsetDeformConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, weight, offsets)
        return deform_conv2d(x, offsets, weight, padding=(1, 1))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # noqa: ANN001
        x, weight, offsets = ctx.saved_tensors
        n, c, h, w = x.shape
        out_channels = weight.shape[0]
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            taps = sampled_taps(leaf, offsets)
        flat_grad = grad.reshape(n, out_channels, h * w)
        grad_weight = torch.einsum("noq,nkq->ok", flat_grad, taps.detach().view(n, c * 9, h * w))
        grad_taps = torch.matmul(weight.view(out_channels, c * 9).t(), flat_grad)  # [N, C*9, H*W]
        (grad_x,) = torch.autograd.grad(taps, leaf, grad_taps.view(n, c, 9, h, w))
        return grad_x, grad_weight.view_as(weight), None


def deform_conv3x3_fixed_offsets(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """A 3x3, stride 1, padding 1, bias-free deformable conv whose offsets take no gradient; see the module."""
    if offsets.requires_grad:
        raise ValueError("deform_conv3x3_fixed_offsets: the offsets must not need a gradient")
    return _FixedOffsetDeformConv.apply(x, weight, offsets)
