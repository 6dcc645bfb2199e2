"""The coarse-to-fine RPN's deformable conv at fixed offsets: torchvision's forward, our backward."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from tod_deploy.nn.heads.crpn import AdaptiveConv, anchor_offsets
from tod_deploy.nn.heads.fixed_offset_deform_conv import deform_conv3x3_fixed_offsets


def inputs(dtype: torch.dtype, offsets_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 11, dtype=dtype, generator=generator, requires_grad=True)
    weight = torch.randn(4, 5, 3, 3, dtype=dtype, generator=generator, requires_grad=True)
    offsets = torch.randn(2, 18, 9, 11, dtype=dtype, generator=generator) * offsets_scale  # taps off the map too
    return x, weight, offsets


@pytest.mark.parametrize("offsets_scale", [0.0, 4.0])
def test_values_and_gradients_are_torchvisions(offsets_scale: float) -> None:
    """Forward bit for bit; the gradients of the input and the weight against torchvision's backward
    (float64, so only summation order differs)."""
    x, weight, offsets = inputs(torch.float64, offsets_scale)
    upstream = torch.randn(2, 4, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = deform_conv2d(x, offsets, weight, padding=(1, 1))
    got = deform_conv3x3_fixed_offsets(x, weight, offsets)
    assert torch.equal(got, expected)
    for mine, theirs in zip(torch.autograd.grad(got, (x, weight), upstream),
                            torch.autograd.grad(expected, (x, weight), upstream), strict=True):  # fmt: skip
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_gradient_is_the_exact_derivative() -> None:
    """Against finite differences of the forward (random projections of both Jacobians)."""
    x, weight, offsets = inputs(torch.float64, 3.0)
    conv = lambda x, w: deform_conv3x3_fixed_offsets(x, w, offsets)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, weight), fast_mode=True)


def test_offsets_that_need_a_gradient_are_refused() -> None:
    x, weight, offsets = inputs(torch.float32, 1.0)
    with pytest.raises(ValueError, match="must not need a gradient"):
        deform_conv3x3_fixed_offsets(x, weight, offsets.requires_grad_())


def test_rpn_stage_one_runs_it_eagerly() -> None:
    """The RPN's adaptive conv, fed offsets computed from (detached) boxes as the RPN computes them:
    run eagerly it takes this backward, with torchvision's values."""
    conv = AdaptiveConv(5, deformable=True, dilation=1)
    boxes = torch.tensor([[2.0, 3.0, 30.0, 20.0]]).expand(2, 20, 4)
    offsets = anchor_offsets(boxes, 8, (4, 5))
    x = torch.randn(2, 5, 4, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = conv(x, offsets)
    assert type(out.grad_fn).__name__ == "_FixedOffsetDeformConvBackward"
    assert torch.equal(out, conv.conv(x, offsets))
