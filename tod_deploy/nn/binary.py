"""1-bit building blocks (DFR-Det and the public codebases it builds on: ReActNet, BiDet, IDa-Det).

The forward pass of :class:`BinaryConv2d` is, in training and in eval alike, a float conv of
tensors holding only -1, 0 and +1 followed by the per-channel scale: integer sums below 2**24 are
exact in float32 whatever order the conv adds them in, so this module computes bit for bit what
``tod::BinaryConv2d`` (``tod_deploy/ops/binary_conv_ref.py``) defines, while staying
differentiable for training.

Gradients (straight-through estimators), chosen to match the codebases:

- activations, ``ste="approx"`` (default): Bi-Real Net's ApproxSign, also ReActNet's
  ``BinaryActivation``: d sign(u)/du ~= 2 - 2|u| for |u| < 1, else 0 (a piecewise-quadratic
  approximation of sign). ``ste="clip"``: the BNN/XNOR hard-tanh STE, 1 for |u| <= 1, else 0.
  Either way no gradient passes where |u| > 1, with u = x - threshold.
- weights: ReActNet's clipped identity, gradient 1 where |w| <= 1, 0 elsewhere; the
  ``mean_abs`` scale is detached as in ReActNet (a ``learned`` scale gets its own gradient).
- thresholds (RSign): through u = x - threshold, so d/d threshold = -d/du.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.errors import UserError
from tod_deploy.ops.binary_conv_ref import BinaryConvAttrs

Ste = Literal["approx", "clip"]
AlphaMode = Literal["mean_abs", "learned"]


def binarize_values(u: Tensor, zero_sign: int) -> Tensor:
    """+1 where u > 0, -1 where u < 0, ``zero_sign`` where u == 0 (and NaN), in u's dtype."""
    filler = torch.full_like(u, float(zero_sign))
    return torch.where(u > 0, torch.ones_like(u), torch.where(u < 0, -torch.ones_like(u), filler))


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, u: Tensor, zero_sign: int, ste: str) -> Tensor:
        ctx.save_for_backward(u)
        ctx.ste = ste  # type: ignore[attr-defined]
        return binarize_values(u, zero_sign)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        (u,) = ctx.saved_tensors  # type: ignore[attr-defined]
        if ctx.ste == "clip":  # type: ignore[attr-defined]
            return grad * (u.abs() <= 1).to(grad.dtype), None, None
        return grad * (2 - 2 * u.abs()).clamp(min=0), None, None


class _WeightSignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: Tensor, zero_sign: int) -> Tensor:
        ctx.save_for_backward(w)
        return binarize_values(w, zero_sign)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (w,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * (w.abs() <= 1).to(grad.dtype), None


def _check_choices(zero_sign: int, ste: str) -> None:
    if zero_sign not in (-1, 0, 1):
        raise UserError(f"zero_sign={zero_sign} is unsupported", "use +1, -1 or 0 (what sign(0) is)")
    if ste not in ("approx", "clip"):
        raise UserError(f"ste={ste!r} is unsupported", "use 'approx' (Bi-Real/ReActNet) or 'clip' (hard-tanh)")


def sign_ste(x: Tensor, threshold: Tensor | float = 0.0, zero_sign: int = -1, ste: Ste = "approx") -> Tensor:
    """Binarize ``x`` against ``threshold`` with a straight-through gradient (see module docstring).

    ``x - threshold > 0`` is exactly ``x > threshold`` in IEEE arithmetic, so the threshold can be
    a learnable tensor without changing which values become +1.
    """
    _check_choices(zero_sign, ste)
    return _SignSTE.apply(x - threshold, zero_sign, ste)


class RSign(nn.Module):
    """ReActNet's RSign: sign(x - threshold[c]) with a learnable threshold per channel."""

    def __init__(self, channels: int, zero_sign: int = -1, ste: Ste = "approx") -> None:
        super().__init__()
        _check_choices(zero_sign, ste)
        self.threshold = nn.Parameter(torch.zeros(channels))
        self.zero_sign = zero_sign
        self.ste = ste

    def forward(self, x: Tensor) -> Tensor:
        return sign_ste(x, self.threshold.view(1, -1, 1, 1), self.zero_sign, self.ste)


class RPReLU(nn.Module):
    """ReActNet's RPReLU: PReLU(x - shift_in[c]) + shift_out[c], slopes per channel."""

    def __init__(self, channels: int, init_slope: float = 0.25) -> None:
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.weight = nn.Parameter(torch.full((channels,), init_slope))
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x - self.shift_in.view(1, -1, 1, 1), self.weight) + self.shift_out.view(1, -1, 1, 1)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class BinaryConv2d(nn.Module):
    """out = alpha[o] * conv(pad(sign(x - threshold)), sign(W)) + bias[o].

    Options cover the public codebases so each one's checkpoints export exactly:

    - ``alpha``: ``"mean_abs"`` (alpha[o] = mean |W[o]|; ReActNet, BiDet) or ``"learned"`` (a
      parameter ``alpha`` [Cout]; IDa-Det), initialised to mean |W[o]|.
    - ``pad_value``: what padding holds after the sign: 0 (ReActNet, IDa-Det) or -1 (BiDet), or +1.
    - ``zero_sign``: sign(0): torch.sign gives 0 (all three codebases), the DFR-Det paper -1, or +1.
    - ``threshold``: a float (x > threshold -> +1) or ``"learned"``: a per-input-channel
      parameter ``threshold`` (RSign folded into the conv).

    State dict: ``weight`` (latent real weights [Cout, Cin/groups, k, k]), ``alpha`` when learned,
    ``bias`` when present, ``threshold`` when learned.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        alpha: AlphaMode = "mean_abs",
        pad_value: int = 0,
        zero_sign: int = -1,
        threshold: float | Literal["learned"] = 0.0,
        ste: Ste = "approx",
    ) -> None:
        super().__init__()
        _check_choices(zero_sign, ste)
        if alpha not in ("mean_abs", "learned"):
            raise UserError(f"alpha={alpha!r} is unsupported", "use 'mean_abs' (ReActNet/BiDet) or 'learned' (IDa-Det)")
        if pad_value not in (-1, 0, 1):
            raise UserError(f"pad_value={pad_value} is unsupported", "use 0 (ReActNet/IDa-Det), -1 (BiDet) or +1")
        if in_channels % groups or out_channels % groups:
            raise UserError(f"groups={groups} does not divide {in_channels}->{out_channels}", "fix the channel counts")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.alpha_mode, self.pad_value, self.zero_sign, self.ste = alpha, int(pad_value), int(zero_sign), ste
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.alpha = nn.Parameter(self._mean_abs().detach().clone()) if alpha == "learned" else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if threshold == "learned":
            self.threshold: nn.Parameter | None = nn.Parameter(torch.zeros(in_channels))
            self.threshold_value = 0.0
        else:
            self.threshold = None
            self.threshold_value = float(threshold)

    def _mean_abs(self) -> Tensor:
        return self.weight.abs().mean(dim=(1, 2, 3))

    def scale(self) -> Tensor:
        """alpha [Cout] as the forward uses it (mean |W| is detached, as in ReActNet)."""
        return self.alpha if self.alpha is not None else self._mean_abs().detach()

    def binary_weight(self) -> Tensor:
        return _WeightSignSTE.apply(self.weight, self.zero_sign)

    def input_threshold(self) -> Tensor | float:
        return self.threshold.view(1, -1, 1, 1) if self.threshold is not None else self.threshold_value

    def decide(self, x: Tensor) -> Tensor:
        """The layer's hard decision on its input: the signs the convolution sees (parity/forcing.py)."""
        return binarize_values(x - self.input_threshold(), self.zero_sign)

    def op_attrs(self) -> BinaryConvAttrs:
        """Attributes of the equivalent ``tod::BinaryConv2d`` (a learned threshold goes in front of it)."""
        ph, pw = self.padding
        return BinaryConvAttrs(
            kernel_shape=self.kernel_size,
            in_channels=self.in_channels,
            strides=self.stride,
            pads=(ph, pw, ph, pw),
            dilations=self.dilation,
            group=self.groups,
            threshold=self.threshold_value if self.threshold is None else 0.0,
            zero_sign=self.zero_sign,
            pad_value=self.pad_value,
        )

    def forward(self, x: Tensor) -> Tensor:
        xb = sign_ste(x, self.input_threshold(), self.zero_sign, self.ste)
        ph, pw = self.padding
        if ph or pw:
            xb = F.pad(xb, (pw, pw, ph, ph), value=float(self.pad_value))
        sums = F.conv2d(xb, self.binary_weight(), None, self.stride, 0, self.dilation, self.groups)
        out = sums * self.scale().view(1, -1, 1, 1)
        return out + self.bias.view(1, -1, 1, 1) if self.bias is not None else out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"alpha={self.alpha_mode}, pad_value={self.pad_value}, zero_sign={self.zero_sign}, "
            f"threshold={'learned' if self.threshold is not None else self.threshold_value}, ste={self.ste}"
        )
