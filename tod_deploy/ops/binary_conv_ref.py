"""``tod::BinaryConv2d`` (domain ``tod``, version 2): the definition every implementation is tested against.

Semantics
---------
For input ``X`` float ``[N, C, H, W]`` and latent weights ``W`` ``[Cout, C/group, KH, KW]``:

1. Binarize the input against ``threshold`` (a float attribute; per-channel thresholds, e.g.
   from RSign, are a ``Sub`` in front of the op with ``threshold = 0``, which is exact because
   for IEEE floats with gradual underflow ``x - t > 0`` iff ``x > t`` and ``x - t == 0`` iff ``x == t``)::

       xb = +1 if x > threshold;  -1 if x < threshold;  zero_sign if x == threshold (or NaN)

2. Pad ``xb`` (after binarization) with ``pad_value`` in {0, +1, -1}: 0 is ReActNet/IDa-Det,
   -1 is BiDet. Pads are ONNX-ordered ``[top, left, bottom, right]``.
3. Binarize the weights with the same rule at threshold 0: ``wb = +1 / -1 / zero_sign``.
4. Integer sum, exact in int32::

       S[n, o, y, x] = sum over (c, ky, kx) in o's group of xb[n, c, y*sh + ky*dh, x*sw + kx*dw] * wb[o, c, ky, kx]

5. ``Y = alpha[o] * float32(S) + bias[o]`` in float32, rounded twice (no fused multiply-add).
6. Fused epilogue (version 2), each step one float32 rounding, in this order::

       Y = Y + residual[n, o, y, x]          if a residual is given (same shape as Y)
       Y = Y < 0 ? 0 : Y                      activation "relu"
       Y = Y < 0 ? slope[o] * Y : Y           activation "prelu" (per output channel)

   NaN passes through both activations. This is what the unfused graph computes with an ONNX
   ``Add`` and ``Relu``/``PRelu`` after the node, so fusing them (``fuse_epilogues``) changes no bit:
   a Bi-Real block's ``prelu(alpha * S + bias + shortcut)`` is then one pass over the output map
   instead of three (what OpenVINO's BinaryConvolution and LCE fuse too).

``zero_sign`` is what sign(0) is: ``torch.sign`` (used by ReActNet, BiDet, IDa-Det code) gives 0,
the DFR-Det paper defines -1; +1 is also allowed.

Weight bit-packing (input ``W_packed``, uint8)
---------------------------------------------
Shape ``[Cout, KH, KW, words * 8]`` with ``words = ceil((C / group) / 64)``. For each output channel
``o`` and tap ``(ky, kx)`` (reduction order (ky, kx, c), c fastest) the group's ``C/group`` weight
bits form ``words`` 64-bit little-endian words: channel ``c`` is bit ``c % 64`` of word ``c // 64``
(``numpy.packbits(..., bitorder="little")``), bit 1 = +1, bit 0 = -1; every tap starts at a new
word and bits past ``C/group`` are 0. Channel counts that are multiples of 64 (all binary convs of
a ResNet-18) cost exactly one bit per weight; others pay the per-tap word padding, which keeps a
kernel's inner loop free of shifts.

Zero weights: with ``zero_sign = 0`` a weight that is exactly 0.0 binarizes to 0, which one bit
cannot hold. Packing rejects it (UserError naming the output channel) instead of adding a second
bit-plane: a trained latent weight is practically never exactly 0, and the simplest format is the
one every kernel shares. Zero *activations* are fully supported (they are common: 0-padding,
ReLU outputs); kernels carry a nonzero bit-plane for them.

ONNX form
---------
onnxruntime-extensions' Python custom-op hook (how onnxruntime runs the op) reads only scalar int,
float and string attributes, and has no optional inputs. So list attributes are strings of
comma-separated ints (``kernel_shape="3,3"``, ``pads="1,1,1,1"``), all ten attributes are always
written, and the six inputs are always there: ``X, W_packed, alpha, bias, residual, slope``.
``bias`` is zeros when the layer has none; an absent ``residual`` or ``slope`` is an empty
float32 tensor (shape ``[0]``); ``slope`` has ``Cout`` values exactly when ``activation="prelu"``.

Version 1 (files written before the epilogue) has four inputs and nine attributes; it means
version 2 with no residual and ``activation="none"``; ``binary_conv_versions.upgrade_to_v2`` rewrites it so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tod_deploy.errors import UserError

if TYPE_CHECKING:
    import onnx

OP_TYPE = "BinaryConv2d"
DOMAIN = "tod"
VERSION = 2
WORD_BITS = 64
LIST_ATTRS = ("kernel_shape", "strides", "pads", "dilations")
ACTIVATIONS = ("none", "relu", "prelu")
INPUTS = ("X", "W_packed", "alpha", "bias", "residual", "slope")


def is_binary_conv(node: onnx.NodeProto) -> bool:
    """Whether an ONNX node is this op (its type in its domain)."""
    return node.op_type == OP_TYPE and node.domain == DOMAIN


@dataclass(frozen=True)
class BinaryConvAttrs:
    """The nine attributes of a ``tod::BinaryConv2d`` node, validated once here."""

    kernel_shape: tuple[int, int]
    in_channels: int
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    threshold: float = 0.0
    zero_sign: int = -1
    pad_value: int = 0
    activation: str = "none"

    def __post_init__(self) -> None:
        def ints(name: str, count: int, low: int) -> None:
            value = getattr(self, name)
            if len(value) != count or any(int(v) != v or v < low for v in value):
                raise UserError(f"BinaryConv2d {name}={value} is invalid", f"give {count} integers >= {low}")
            object.__setattr__(self, name, tuple(int(v) for v in value))

        ints("kernel_shape", 2, 1)
        ints("strides", 2, 1)
        ints("pads", 4, 0)
        ints("dilations", 2, 1)
        if self.zero_sign not in (-1, 0, 1):
            raise UserError(f"BinaryConv2d zero_sign={self.zero_sign} is unsupported", "use +1, -1 or 0 (sign(0))")
        if self.pad_value not in (-1, 0, 1):
            raise UserError(f"BinaryConv2d pad_value={self.pad_value} is unsupported", "use 0, +1 or -1")
        if self.group < 1 or self.in_channels < 1 or self.in_channels % self.group:
            raise UserError(
                f"BinaryConv2d group={self.group} does not divide in_channels={self.in_channels}",
                "use a group count that divides the input channels",
            )
        if not math.isfinite(self.threshold):
            raise UserError(f"BinaryConv2d threshold={self.threshold} is not finite", "use a finite threshold")
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"BinaryConv2d activation={self.activation!r} is unsupported", f"use one of {', '.join(ACTIVATIONS)}"
            )
        object.__setattr__(self, "zero_sign", int(self.zero_sign))
        object.__setattr__(self, "pad_value", int(self.pad_value))
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def group_channels(self) -> int:
        return self.in_channels // self.group

    @property
    def words(self) -> int:
        """64-bit words per tap per output channel in ``W_packed``."""
        return -(-self.group_channels // WORD_BITS)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_shape, self.strides, self.dilations
        pt, pl, pb, pr = self.pads
        ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise UserError(f"BinaryConv2d kernel does not fit a {h}x{w} input", "use a larger input or more padding")
        return ho, wo

    def packed_shape(self, out_channels: int) -> tuple[int, int, int, int]:
        return (out_channels, *self.kernel_shape, self.words * 8)

    def to_onnx(self) -> dict[str, str | int | float]:
        """Node attributes as the onnxruntime-extensions hook can read them (see module docstring)."""
        encoded: dict[str, str | int | float] = {name: ",".join(map(str, getattr(self, name))) for name in LIST_ATTRS}
        encoded.update(
            group=self.group,
            in_channels=self.in_channels,
            threshold=self.threshold,
            zero_sign=self.zero_sign,
            pad_value=self.pad_value,
            activation=self.activation,
        )
        return encoded

    @classmethod
    def from_onnx(cls, attrs: Mapping[str, object]) -> BinaryConvAttrs:
        """Parse node attributes; list attributes may be strings ("3,3") or sequences; no ``activation`` is "none"."""
        missing = [name for name in (*LIST_ATTRS, "in_channels") if name not in attrs]
        if missing:
            raise UserError(f"tod::BinaryConv2d node lacks attributes {missing}", "re-export it with tod-deploy")

        def as_ints(value: object) -> tuple[int, ...]:
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str):
                return tuple(int(v) for v in value.split(","))
            return tuple(int(v) for v in value)  # type: ignore[union-attr]

        return cls(
            kernel_shape=as_ints(attrs["kernel_shape"]),  # type: ignore[arg-type]
            strides=as_ints(attrs["strides"]),  # type: ignore[arg-type]
            pads=as_ints(attrs["pads"]),  # type: ignore[arg-type]
            dilations=as_ints(attrs["dilations"]),  # type: ignore[arg-type]
            group=int(attrs.get("group", 1)),  # type: ignore[call-overload]
            in_channels=int(attrs["in_channels"]),  # type: ignore[call-overload]
            threshold=float(attrs.get("threshold", 0.0)),  # type: ignore[arg-type]
            zero_sign=int(attrs.get("zero_sign", -1)),  # type: ignore[call-overload]
            pad_value=int(attrs.get("pad_value", 0)),  # type: ignore[call-overload]
            activation=_text(attrs.get("activation", "none")),
        )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def binarize(values: np.ndarray, threshold: float | np.ndarray, zero_sign: int) -> np.ndarray:
    """+1 above, -1 below, ``zero_sign`` at the threshold (and for NaN), as int8.

    ``threshold`` is a scalar or one value per channel (axis 1).
    """
    thr = np.asarray(threshold, dtype=np.float32)
    if thr.ndim == 1:
        thr = thr.reshape(1, -1, *([1] * (values.ndim - 2)))
    out = np.full(values.shape, zero_sign, dtype=np.int8)
    out[values > thr] = 1
    out[values < thr] = -1
    return out


def pack_weights(weight: np.ndarray, zero_sign: int, layer: str = "BinaryConv2d") -> np.ndarray:
    """Latent (or +-1) weights ``[Cout, Cg, KH, KW]`` -> ``W_packed`` uint8 (format in the module docstring)."""
    wb = binarize(np.asarray(weight, dtype=np.float32), 0.0, zero_sign)
    zeros = np.argwhere(wb == 0)
    if zeros.size:
        o = int(zeros[0][0])
        raise UserError(
            f"{layer}: {len(zeros)} weight(s) are exactly 0 (first in output channel {o}) and zero_sign=0 makes "
            "them 0, which the 1-bit W_packed format cannot store",
            "export with zero_sign=+1 or -1, nudge those weights off 0, or use --binary-conv decompose",
        )
    cout, cg, kh, kw = wb.shape
    words = -(-cg // WORD_BITS)
    bits = np.zeros((cout, kh, kw, words * WORD_BITS), dtype=bool)
    bits[..., :cg] = (wb > 0).transpose(0, 2, 3, 1)
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_weights(w_packed: np.ndarray, group_channels: int) -> np.ndarray:
    """``W_packed`` -> +-1 int8 weights ``[Cout, Cg, KH, KW]`` (the inverse of :func:`pack_weights`)."""
    bits = np.unpackbits(np.asarray(w_packed, dtype=np.uint8), axis=-1, bitorder="little")[..., :group_channels]
    return (bits.astype(np.int8) * 2 - 1).transpose(0, 3, 1, 2)


def binary_conv2d_sums(
    x: np.ndarray, weight: np.ndarray, attrs: BinaryConvAttrs, threshold: float | np.ndarray | None = None
) -> np.ndarray:
    """The integer sums S ``[N, Cout, Ho, Wo]`` int32 (steps 1-4 of the definition).

    ``threshold`` overrides ``attrs.threshold``, e.g. with one value per input channel.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != attrs.in_channels:
        raise UserError(f"BinaryConv2d input shape {x.shape} is not [N, {attrs.in_channels}, H, W]", "fix the input")
    n, _, h, w = x.shape
    thr = attrs.threshold if threshold is None else threshold
    xb = binarize(x, thr, attrs.zero_sign).astype(np.int64)
    pt, pl, pb, pr = attrs.pads
    xp = np.pad(xb, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=attrs.pad_value)
    wb = binarize(np.asarray(weight, dtype=np.float32), 0.0, attrs.zero_sign).astype(np.int64)
    cout = wb.shape[0]
    ho, wo = attrs.output_size(h, w)
    (kh, kw), (sh, sw), (dh, dw) = attrs.kernel_shape, attrs.strides, attrs.dilations
    cg, cog = attrs.group_channels, cout // attrs.group
    sums = np.zeros((n, cout, ho, wo), dtype=np.int64)
    for g in range(attrs.group):
        xs, os_ = slice(g * cg, (g + 1) * cg), slice(g * cog, (g + 1) * cog)
        for ky in range(kh):
            for kx in range(kw):
                patch = xp[
                    :, xs, ky * dh : ky * dh + sh * (ho - 1) + 1 : sh, kx * dw : kx * dw + sw * (wo - 1) + 1 : sw
                ]
                sums[:, os_] += np.einsum("nchw,oc->nohw", patch, wb[os_, :, ky, kx], optimize=True)
    return sums.astype(np.int32)


def scale_sums(sums: np.ndarray, alpha: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Step 5: ``alpha[o] * float32(S) + bias[o]`` in float32, two roundings."""
    out = np.asarray(alpha, dtype=np.float32).reshape(1, -1, 1, 1) * sums.astype(np.float32)
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float32).reshape(1, -1, 1, 1)
    return out.astype(np.float32, copy=False)


def apply_epilogue(
    y: np.ndarray, activation: str = "none", residual: np.ndarray | None = None, slope: np.ndarray | None = None
) -> np.ndarray:
    """Step 6: ``y`` (step 5's output) plus the residual, then the activation, each rounded to float32.

    An empty ``residual`` is none, as in the ONNX form.
    """
    y = np.asarray(y, dtype=np.float32)
    if residual is not None and np.size(residual):
        residual = np.asarray(residual, dtype=np.float32)
        if residual.shape != y.shape:
            raise UserError(f"BinaryConv2d residual shape {residual.shape} is not the output's {y.shape}", "fix it")
        y = y + residual
    if activation == "relu":
        y = np.where(y < 0, np.float32(0), y)
    elif activation == "prelu":
        slope = np.asarray(slope if slope is not None else [], dtype=np.float32).reshape(-1)
        if slope.size != y.shape[1]:
            raise UserError(f"BinaryConv2d prelu needs {y.shape[1]} slopes, got {slope.size}", "give one per channel")
        y = np.where(y < 0, slope.reshape(1, -1, 1, 1) * y, y)
    return y.astype(np.float32, copy=False)


def binary_conv2d_ref(
    x: np.ndarray,
    weight: np.ndarray,
    alpha: np.ndarray,
    bias: np.ndarray | None,
    attrs: BinaryConvAttrs,
    threshold: float | np.ndarray | None = None,
    residual: np.ndarray | None = None,
    slope: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``tod::BinaryConv2d``: returns (S int32, Y float32). ``weight`` may be latent floats or +-1."""
    sums = binary_conv2d_sums(x, weight, attrs, threshold)
    return sums, apply_epilogue(scale_sums(sums, alpha, bias), attrs.activation, residual, slope)
