"""Deploy forms of :class:`tod_deploy.nn.binary.BinaryConv2d` for PyTorch inference and ONNX export.

- :class:`PackedBinaryConv2d` holds the weights as bits and calls the torch custom op
  ``tod::binary_conv2d``, whose CPU implementation is the compiled kernel (so a deployed model
  runs fast in PyTorch too) and whose ONNX translation is the ``tod::BinaryConv2d`` node.
- :class:`DecomposedBinaryConv2d` is the same computation in standard torch ops only
  (where/pad/conv/mul/add), which the dynamo exporter maps onto standard ONNX ops.

Both are built from a trained module by :func:`packed_from` / :func:`decomposed_from`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.nn.binary import BinaryConv2d, binarize_values
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.ops.binary_conv_ref import BinaryConvAttrs, pack_weights


def attrs_from_args(
    kernel_shape: list[int],
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    group: int,
    in_channels: int,
    threshold: float,
    zero_sign: int,
    pad_value: int,
    activation: str = "none",
) -> BinaryConvAttrs:
    """The op's attributes from the flat argument lists torch.library and onnxscript pass around."""
    return BinaryConvAttrs(
        kernel_shape=tuple(kernel_shape),  # type: ignore[arg-type]
        in_channels=in_channels,
        strides=tuple(strides),  # type: ignore[arg-type]
        pads=tuple(pads),  # type: ignore[arg-type]
        dilations=tuple(dilations),  # type: ignore[arg-type]
        group=group,
        threshold=threshold,
        zero_sign=zero_sign,
        pad_value=pad_value,
        activation=activation,
    )


@torch.library.custom_op("tod::binary_conv2d", mutates_args=())
def binary_conv2d_op(
    x: Tensor,
    w_packed: Tensor,
    alpha: Tensor,
    bias: Tensor,
    residual: Tensor,
    slope: Tensor,
    kernel_shape: list[int],
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    group: int,
    in_channels: int,
    threshold: float,
    zero_sign: int,
    pad_value: int,
    activation: str,
) -> Tensor:
    """``tod::BinaryConv2d`` on CPU tensors through the compiled kernel (inference only, no autograd).

    ``residual`` and ``slope`` are the fused epilogue's inputs, empty when absent (the ONNX form).
    """
    attrs = attrs_from_args(
        kernel_shape, strides, pads, dilations, group, in_channels, threshold, zero_sign, pad_value, activation
    )
    out = binary_conv_cpu.binary_conv2d(
        x.detach().cpu().numpy(),
        w_packed.cpu().numpy(),
        alpha.detach().cpu().numpy(),
        bias.detach().cpu().numpy(),
        attrs,
        residual=residual.detach().cpu().numpy(),
        slope=slope.detach().cpu().numpy(),
    )
    return torch.from_numpy(out).to(x.device)


@binary_conv2d_op.register_fake
def _(
    x: Tensor,
    w_packed: Tensor,
    alpha: Tensor,
    bias: Tensor,
    residual: Tensor,
    slope: Tensor,
    kernel_shape: list[int],
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    group: int,
    in_channels: int,
    threshold: float,
    zero_sign: int,
    pad_value: int,
    activation: str,
) -> Tensor:
    attrs = attrs_from_args(
        kernel_shape, strides, pads, dilations, group, in_channels, threshold, zero_sign, pad_value, activation
    )
    ho, wo = attrs.output_size(int(x.shape[2]), int(x.shape[3]))
    return x.new_empty((x.shape[0], w_packed.shape[0], ho, wo))


class PackedBinaryConv2d(nn.Module):
    """Weights as bits (``w_packed`` uint8), alpha and bias as floats; runs ``tod::binary_conv2d``.

    A per-channel (learned) threshold stays a subtraction in front of the op, which is exact
    (see ``binary_conv_ref``), because the op's ``threshold`` is one float.
    """

    def __init__(
        self, attrs: BinaryConvAttrs, w_packed: Tensor, alpha: Tensor, bias: Tensor, channel_threshold: Tensor | None
    ) -> None:
        super().__init__()
        self.attrs = attrs
        self.in_channels, self.out_channels = attrs.in_channels, int(w_packed.shape[0])
        self.register_buffer("w_packed", w_packed)
        self.register_buffer("alpha", alpha)
        self.register_buffer("bias", bias)
        self.register_buffer("channel_threshold", channel_threshold)
        # no residual, no slope: export fuses the epilogue afterwards, as a graph pass
        self.register_buffer("epilogue_none", torch.zeros(0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_threshold is not None:
            x = x - self.channel_threshold.view(1, -1, 1, 1)
        a = self.attrs
        return binary_conv2d_op(
            x,
            self.w_packed,
            self.alpha,
            self.bias,
            self.epilogue_none,
            self.epilogue_none,
            list(a.kernel_shape),
            list(a.strides),
            list(a.pads),
            list(a.dilations),
            a.group,
            a.in_channels,
            a.threshold,
            a.zero_sign,
            a.pad_value,
            a.activation,
        )


class DecomposedBinaryConv2d(nn.Module):
    """The op in standard torch ops: compare/where -> pad -> conv with +-1 weights -> * alpha (+ bias)."""

    def __init__(
        self, attrs: BinaryConvAttrs, weight_sign: Tensor, alpha: Tensor, bias: Tensor | None, threshold: Tensor | float
    ) -> None:
        super().__init__()
        self.attrs = attrs
        self.in_channels, self.out_channels = attrs.in_channels, int(weight_sign.shape[0])
        self.register_buffer("weight_sign", weight_sign)
        self.register_buffer("alpha", alpha.view(1, -1, 1, 1))
        self.register_buffer("bias", None if bias is None else bias.view(1, -1, 1, 1))
        if isinstance(threshold, Tensor):
            self.register_buffer("threshold", threshold.view(1, -1, 1, 1))
        else:
            self.threshold = float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        a = self.attrs
        thr = self.threshold
        if a.zero_sign == -1:  # NaN and x == t go to -1: one Where suffices
            xb = torch.where(x > thr, 1.0, -1.0)
        elif a.zero_sign == 1:
            xb = torch.where(x < thr, -1.0, 1.0)
        else:
            xb = torch.where(x > thr, 1.0, torch.where(x < thr, -1.0, 0.0))
        pt, pl, pb, pr = a.pads
        if pt or pl or pb or pr:
            xb = F.pad(xb, (pl, pr, pt, pb), value=float(a.pad_value))
        out = F.conv2d(xb, self.weight_sign, None, a.strides, 0, a.dilations, a.group) * self.alpha
        return out + self.bias if self.bias is not None else out


def _exported_tensors(module: BinaryConv2d) -> tuple[Tensor, Tensor | None]:
    with torch.no_grad():
        return module.scale().detach().float().clone(), None if module.bias is None else module.bias.detach().float()


def packed_from(module: BinaryConv2d, name: str = "BinaryConv2d") -> PackedBinaryConv2d:
    """The plugin form of a trained layer; ``name`` labels errors (e.g. zero weights with zero_sign=0)."""
    alpha, bias = _exported_tensors(module)
    w_packed = pack_weights(module.weight.detach().cpu().float().numpy(), module.zero_sign, layer=name)
    threshold = None if module.threshold is None else module.threshold.detach().float().clone()
    bias = torch.zeros_like(alpha) if bias is None else bias.clone()
    return PackedBinaryConv2d(
        module.op_attrs(), torch.from_numpy(np.ascontiguousarray(w_packed)), alpha, bias, threshold
    )


def decomposed_from(module: BinaryConv2d) -> DecomposedBinaryConv2d:
    alpha, bias = _exported_tensors(module)
    with torch.no_grad():
        weight_sign = binarize_values(module.weight.detach().float(), module.zero_sign).clone()
    threshold = module.threshold.detach().float().clone() if module.threshold is not None else module.threshold_value
    return DecomposedBinaryConv2d(
        module.op_attrs(), weight_sign, alpha, None if bias is None else bias.clone(), threshold
    )
