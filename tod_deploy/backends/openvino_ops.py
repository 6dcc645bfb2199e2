"""OpenVINO's reading of the two ONNX ops its ONNX frontend lacks: ``DeformConv`` and ``tod::BinaryConv2d``.

Both are conversion extensions of the ONNX frontend, so OpenVINO reads our files as they are written.

``tod::BinaryConv2d`` becomes OpenVINO's own 1-bit convolution where that computes our op exactly
(the definition is ``ops/binary_conv_ref.py``): ``FakeQuantize(levels=2)`` -> ``BinaryConvolution``
(``xnor-popcount``, u1 weights) -> ``Multiply(alpha)`` -> ``Add(bias)`` -> the epilogue. OpenVINO's
CPU plugin runs the convolution on its bit-packed kernel (``jit_avx2_u1`` on an AVX2 CPU) and fuses
the Multiply into it; on OpenVINO 2026.4 with AVX2 the FakeQuantize stays a node of its own, followed
by a reference (non-JIT) Reorder of the bits to channels-last, which cost about as much as the
kernel itself at 64x200x200 (benchmarks/openvino_speed.py). What it cannot express, measured on
OpenVINO 2026.4 against the reference over
``binary_conv_cases``, falls back to the decomposed form (compare -> ``Pad`` -> float ``Convolution``
with +-1 weights) for that node, with the reason kept (:class:`BinaryLayers`):

- ``group != 1``: BinaryConvolution has no groups.
- ``zero_sign = 0``: its inputs are bits; sign(0) = 0 is not one of them.
- input channels not a multiple of 8: the CPU kernel's sums were off by up to 150 at 3, 12, 17, 20,
  33, 65 and 100 channels and exact at 8, 16, 24, 40, 64, 72 and 128 (every binary layer of a ResNet-18
  has 64 to 512).

Binarization: the plugin turns a two-level FakeQuantize with input bounds (low, high) into
``x > low``, provided ``high - low`` is a normal float32 (it flushes subnormals: a width of one
subnormal ulp moved every tie at t = 0). So the bounds are (t, the next float up) for
``zero_sign=-1`` (x == t -> bit 0 -> -1) and (the next float down, t) for ``zero_sign=+1``, each
widened to the smallest normal float where t's own ulp is subnormal (|t| < 2**-103).
Padding: ``pad_value`` 0, +1 and -1 are exact (0 pads add nothing to the sum, as ours do).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from tod_deploy.ops.binary_conv_ref import DOMAIN, OP_TYPE, BinaryConvAttrs, unpack_weights

NATIVE = "native BinaryConvolution"
BINARY_CHANNEL_MULTIPLE = 8


def native_fallback_reason(attrs: BinaryConvAttrs) -> str | None:
    """Why a layer cannot run as OpenVINO's BinaryConvolution with our semantics, or None when it can."""
    if attrs.group != 1:
        return f"group={attrs.group} (BinaryConvolution has no groups)"
    if attrs.zero_sign == 0:
        return "zero_sign=0 (BinaryConvolution's inputs are bits: sign(0) must be +1 or -1)"
    if attrs.in_channels % BINARY_CHANNEL_MULTIPLE:
        return f"{attrs.in_channels} input channels (OpenVINO's CPU kernel is exact only for multiples of 8)"
    return None


def binarization_bounds(threshold: float, zero_sign: int) -> tuple[np.float32, np.float32]:
    """FakeQuantize input bounds (low, high) whose binarization is ``x > t`` (``x >= t`` for zero_sign=+1)."""
    t, tiny = np.float32(threshold), np.finfo(np.float32).tiny
    if zero_sign < 0:
        return t, max(np.nextafter(t, np.float32(np.inf)), np.float32(t + tiny))
    return min(np.nextafter(t, np.float32(-np.inf)), np.float32(t - tiny)), t


@dataclass
class BinaryLayers:
    """How a model's ``tod::BinaryConv2d`` nodes were read: native, or decomposed and why."""

    native: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"{self.native} as {NATIVE}"]
        parts += [f"{count} decomposed: {reason}" for reason, count in self.fallbacks.items()]
        return f"tod::BinaryConv2d layers: {'; '.join(parts)}"

    def to_dict(self) -> dict[str, Any]:
        return {"native": self.native, "decomposed": dict(self.fallbacks)}


def conversion_extensions(layers: BinaryLayers) -> list[Any]:
    """The frontend extensions to add to a Core before it reads our ONNX files (counting into ``layers``)."""
    from openvino.frontend.onnx import ConversionExtension

    return [
        ConversionExtension("DeformConv", _deform_conv),
        ConversionExtension(OP_TYPE, DOMAIN, lambda node: _binary_conv(node, layers)),
    ]


def _ints(node: Any, name: str, default: list[int]) -> list[int]:
    return [int(v) for v in node.get_attribute(name)] if node.has_attribute(name) else default


def _deform_conv(node: Any) -> list[Any]:
    """ONNX DeformConv (opset 19): offsets (y, x) per tap as torchvision writes them, optional bias and mask.

    ``bilinear_interpolation_pad=True`` samples taps that straddle the border as onnxruntime and
    torchvision do (zeros outside, bilinear weights inside).
    """
    import openvino.opset13 as ops
    from openvino import opset8

    data, weight, offset = node.get_input(0), node.get_input(1), node.get_input(2)
    count = node.get_input_size()
    pads = _ints(node, "pads", [0, 0, 0, 0])
    mask = node.get_input(4) if count > 4 else None
    out = opset8.deformable_convolution(
        data, offset, weight,
        strides=_ints(node, "strides", [1, 1]), pads_begin=pads[:2], pads_end=pads[2:],
        dilations=_ints(node, "dilations", [1, 1]), mask=mask,
        group=int(node.get_attribute("group")) if node.has_attribute("group") else 1,
        deformable_group=int(node.get_attribute("offset_group")) if node.has_attribute("offset_group") else 1,
        bilinear_interpolation_pad=True,
    )  # fmt: skip
    if count > 3:
        out = ops.add(out, ops.unsqueeze(node.get_input(3), ops.constant(np.array([0, 2, 3], np.int64))))
    return [out.output(0)]


def _binary_conv(node: Any, layers: BinaryLayers) -> list[Any]:
    import openvino.opset13 as ops

    names = [f.name for f in fields(BinaryConvAttrs)]
    attrs = BinaryConvAttrs.from_onnx({n: node.get_attribute(n) for n in names if node.has_attribute(n)})
    packed = np.asarray(node.get_input(1).get_node().get_data(), dtype=np.uint8)  # an initializer: a Constant
    weights = unpack_weights(packed.reshape(-1, *attrs.kernel_shape, attrs.words * 8), attrs.group_channels)
    reason = native_fallback_reason(attrs)
    if reason is None:
        layers.native += 1
        sums = _native_sums(ops, node.get_input(0), weights, attrs)
    else:
        layers.fallbacks[reason] += 1
        sums = _decomposed_sums(ops, node.get_input(0), weights, attrs)
    return [_epilogue(ops, node, sums, attrs)]


def _native_sums(ops: Any, x: Any, weights: np.ndarray, attrs: BinaryConvAttrs) -> Any:
    from openvino import Shape, Tensor, Type
    from openvino import op as ov_op

    low, high = binarization_bounds(attrs.threshold, attrs.zero_sign)
    bound = lambda v: ops.constant(np.array(v, np.float32).reshape(1, 1, 1, 1))  # noqa: E731
    bits = ops.fake_quantize(x, bound(low), bound(high), bound(0.0), bound(1.0), 2)
    # u1 weights: one bit per weight in [Cout, C, KH, KW] order, least significant bit first; 1 = +1
    kernel = Tensor(Type.u1, Shape(list(weights.shape)))
    kernel.data[:] = np.packbits((weights > 0).reshape(-1), bitorder="little")
    pt, pl, pb, pr = attrs.pads
    return ops.binary_convolution(
        bits, ov_op.Constant(kernel), list(attrs.strides), [pt, pl], [pb, pr], list(attrs.dilations),
        "xnor-popcount", float(attrs.pad_value),
    )  # fmt: skip


def _decomposed_sums(ops: Any, x: Any, weights: np.ndarray, attrs: BinaryConvAttrs) -> Any:
    """The exact integer sums in float: +-1 (or zero_sign) activations, padded, through a float conv."""
    scalar = lambda v: ops.constant(np.float32(v))  # noqa: E731
    threshold = scalar(attrs.threshold)
    at_or_below = ops.select(ops.less(x, threshold), scalar(-1.0), scalar(attrs.zero_sign))  # NaN: zero_sign
    signs = ops.select(ops.greater(x, threshold), scalar(1.0), at_or_below)
    pt, pl, pb, pr = attrs.pads
    padded = ops.pad(
        signs, ops.constant(np.array([0, 0, pt, pl], np.int64)), ops.constant(np.array([0, 0, pb, pr], np.int64)),
        "constant", scalar(attrs.pad_value),
    )  # fmt: skip
    strides, dilations, zero = list(attrs.strides), list(attrs.dilations), [0, 0]
    kernel = weights.astype(np.float32)
    if attrs.group == 1:
        return ops.convolution(padded, ops.constant(kernel), strides, zero, zero, dilations)
    grouped = kernel.reshape(attrs.group, -1, *kernel.shape[1:])
    return ops.group_convolution(padded, ops.constant(grouped), strides, zero, zero, dilations)


def _epilogue(ops: Any, node: Any, sums: Any, attrs: BinaryConvAttrs) -> Any:
    """``alpha * S + bias``, then the residual and the activation when the node carries them."""
    per_channel = lambda v: ops.unsqueeze(v, ops.constant(np.array([0, 2, 3], np.int64)))  # noqa: E731
    y = ops.add(ops.multiply(sums, per_channel(node.get_input(2))), per_channel(node.get_input(3)))
    residual = node.get_input(4)
    if residual.get_partial_shape().rank.get_length() == 4:  # an empty [0] tensor is "no residual"
        y = ops.add(y, residual)
    if attrs.activation == "relu":
        y = ops.relu(y)
    elif attrs.activation == "prelu":
        y = ops.prelu(y, per_channel(node.get_input(5)))
    return y.output(0)
