"""A hard threshold whose gradient passes straight through (SR-TOD's learnable-threshold sign).

Forward is ``torch.sign`` - exported as ONNX ``Sign`` - so deployment sees a plain op; backward
passes the incoming gradient unchanged to the input (and, through ``x - t``, to the threshold).
"""

from __future__ import annotations

import torch
from torch import Tensor


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
