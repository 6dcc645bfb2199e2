"""A hard threshold whose gradient passes straight through (SR-TOD's learnable-threshold sign).

Forward is ``torch.sign`` - exported as ONNX ``Sign`` - so deployment sees a plain op; backward
passes the incoming gradient unchanged to the input (and, through ``x - t``, to the threshold).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:  # noqa: ARG004 - autograd signature
        return torch.sign(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:  # noqa: ARG004
        return grad


def sign_ste(x: Tensor) -> Tensor:
    """sign(x) in inference, identity gradient in training."""
    return _SignSTE.apply(x) if torch.is_grad_enabled() and x.requires_grad else torch.sign(x)


class ThresholdSign(nn.Module):
    """``sign(x)`` as a module, so parity can find the decision (and teacher-force it: parity/forcing.py).

    It holds no tensors: a model's state dict is the same with it as with a bare ``sign``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return sign_ste(x)

    def decide(self, x: Tensor) -> Tensor:
        """The hard decision on ``x``: what the forward computes, without the gradient path."""
        return torch.sign(x)
