"""ONNX export of :class:`~tod_deploy.nn.binary.BinaryConv2d` layers: ``plugin`` or ``decompose`` mode.

Route (chosen after trying it on torch 2.14.1 with the dynamo exporter): before export, every
``BinaryConv2d`` of a model copy is swapped for its deploy form (:func:`prepare_for_export`):

- ``plugin``: :class:`~tod_deploy.ops.binary_conv_torch.PackedBinaryConv2d`, which calls the torch
  custom op ``tod::binary_conv2d`` (``torch.library.custom_op``). ``torch.onnx.export(...,
  dynamo=True, custom_translation_table=translation_table())`` turns each call into one
  ``tod::BinaryConv2d`` node; its packed weights are a uint8 buffer, so they land in the file
  as a uint8 initializer: one bit per weight. The onnxscript translation needs an ONNX schema
  for the node, which :func:`register_onnx_schema` registers in-process (``onnx.defs``).
- ``decompose``: :class:`~tod_deploy.ops.binary_conv_torch.DecomposedBinaryConv2d`, plain torch
  ops that the exporter maps to Greater/Less/Where -> Pad -> Conv (+-1 weights) -> Mul (-> Add).

Why not a placeholder plus a graph rewrite afterwards: the custom op carries typed attributes
and an output shape (its fake implementation) through ``torch.export``, so nothing has to be
recognised again in the ONNX graph, and the same op runs the compiled kernel in PyTorch.

After export, :func:`finalize` runs the mode's graph pass (onnx-graphsurgeon):

- plugin: :func:`fold_input_binarization` folds an explicit ``Sign`` or a scalar ``Sub``/``Add``
  threshold in front of a ``tod::BinaryConv2d`` into the node.
- decompose: :func:`dequantized_sign_weights` stores the +-1 weights as int8 behind a
  ``DequantizeLinear`` (scale 1). Without it onnxruntime's basic-level optimizer folds the
  following ``Mul(alpha)``/``Add(bias)`` into the Conv (rescaling the weights), which changes
  the rounding of ``alpha * S + bias``; in a 1-bit network the next layer's sign then flips
  near 0. With it the Conv's weights are not an initializer, no fusion happens, the output is
  bit-exact, and the file is 4x smaller.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxscript
import torch
from onnx.defs import OpSchema
from torch import nn

from tod_deploy.errors import UserError
from tod_deploy.export.passes import IR_VERSION
from tod_deploy.nn.binary import BinaryConv2d
from tod_deploy.ops.binary_conv_ref import DOMAIN, LIST_ATTRS, OP_TYPE, VERSION
from tod_deploy.ops.binary_conv_torch import attrs_from_args, decomposed_from, packed_from

Mode = Literal["plugin", "decompose"]
MODES: tuple[str, ...] = ("plugin", "decompose")
_TOD = onnxscript.values.Opset(DOMAIN, VERSION)


def register_onnx_schema() -> None:
    """Make ``tod::BinaryConv2d`` v1 known to onnx (and so to onnxscript and the checker) in this process."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    attr = OpSchema.Attribute
    string, integer, floating = OpSchema.AttrType.STRING, OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
    schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        doc="1-bit convolution; semantics in tod_deploy/ops/binary_conv_ref.py",
        inputs=[
            OpSchema.FormalParameter("X", "tensor(float)"),
            OpSchema.FormalParameter("W_packed", "tensor(uint8)"),
            OpSchema.FormalParameter("alpha", "tensor(float)"),
            OpSchema.FormalParameter("bias", "tensor(float)", param_option=OpSchema.FormalParameterOption.Optional),
        ],
        outputs=[OpSchema.FormalParameter("Y", "tensor(float)")],
        attributes=[
            *(attr(name, string, "comma-separated ints") for name in LIST_ATTRS),
            attr("group", integer, "groups"),
            attr("in_channels", integer, "input channels"),
            attr("threshold", floating, "x > threshold -> +1"),
            attr("zero_sign", integer, "sign(0): +1, -1 or 0"),
            attr("pad_value", integer, "padding after the sign: 0, +1 or -1"),
        ],
    )
    onnx.defs.register_schema(schema)


def _translate_plugin(
    x: Any,
    w_packed: Any,
    alpha: Any,
    bias: Any,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    group: int,
    in_channels: int,
    threshold: float,
    zero_sign: int,
    pad_value: int,
) -> Any:
    attrs = attrs_from_args(
        list(kernel_shape), list(strides), list(pads), list(dilations), group, in_channels, threshold, zero_sign,
        pad_value,
    )  # fmt: skip
    return _TOD.BinaryConv2d(x, w_packed, alpha, bias, **attrs.to_onnx())


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: tod::binary_conv2d -> node."""
    register_onnx_schema()
    return {torch.ops.tod.binary_conv2d.default: _translate_plugin}


def prepare_for_export(model: nn.Module, mode: Mode) -> nn.Module:
    """A copy of ``model`` whose BinaryConv2d layers are in their ``mode`` deploy form (the original is untouched)."""
    if mode not in MODES:
        raise UserError(f"unknown binary-conv export mode {mode!r}", "use --binary-conv plugin or decompose")
    if isinstance(model, BinaryConv2d):
        return packed_from(model) if mode == "plugin" else decomposed_from(model)
    prepared = copy.deepcopy(model)
    for name, module in list(prepared.named_modules()):
        if not isinstance(module, BinaryConv2d):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = prepared.get_submodule(parent_name) if parent_name else prepared
        setattr(parent, child, packed_from(module, name) if mode == "plugin" else decomposed_from(module))
    return prepared


def export_onnx(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    mode: Mode,
    *,
    opset: int = 18,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: Any = None,
    fold: bool = True,
) -> onnx.ModelProto:
    """Export a model holding BinaryConv2d layers (``mode`` as above) with the dynamo exporter.

    This is what an export pipeline calls: ``prepare_for_export`` + ``torch.onnx.export`` with
    :func:`translation_table`, the IR version onnxruntime reads, and the fold pass.
    """
    prepared = prepare_for_export(model, mode).eval()
    noisy = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                prepared,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(),
                optimize=True,
                verbose=False,
            )
    finally:
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    return finalize(proto, mode) if fold else proto


def finalize(model: onnx.ModelProto, mode: Mode) -> onnx.ModelProto:
    """The graph pass an export in ``mode`` needs after ``torch.onnx.export`` (see module docstring)."""
    return fold_input_binarization(model) if mode == "plugin" else dequantized_sign_weights(model)


def _export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = like.ir_version
    out.producer_name, out.producer_version = like.producer_name, like.producer_version
    return out


def dequantized_sign_weights(model: onnx.ModelProto, suffix: str = "weight_sign") -> onnx.ModelProto:
    """Conv weights named ``*weight_sign`` holding only -1/0/+1 -> int8 initializer + DequantizeLinear."""
    graph = gs.import_onnx(model)
    changed = False
    for node in list(graph.nodes):
        if node.op != "Conv" or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant) or not weight.name.endswith(suffix):
            continue
        values = np.asarray(weight.values)
        if values.dtype != np.float32 or not np.isin(values, (-1.0, 0.0, 1.0)).all():
            continue
        quantized = gs.Constant(f"{weight.name}_int8", values.astype(np.int8))
        scale = gs.Constant(f"{weight.name}_scale", np.array(1.0, dtype=np.float32))
        dequantized = gs.Variable(f"{weight.name}_float", dtype=np.float32, shape=list(values.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", inputs=[quantized, scale], outputs=[dequantized]))
        node.inputs[1] = dequantized
        changed = True
    return _export_graph(graph, model) if changed else model


def _scalar_constant(tensor: gs.Tensor) -> float | None:
    """The value of a one-element float constant (initializer or Constant node), else None."""
    values: np.ndarray | None = None
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
    elif len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant" and "value" in tensor.inputs[0].attrs:
        values = np.asarray(tensor.inputs[0].attrs["value"].values)
    if values is None or values.size != 1 or values.dtype != np.float32:
        return None
    value = float(values.reshape(-1)[0])
    return value if math.isfinite(value) else None


def _fold_one(node: gs.Node) -> bool:
    """Fold the producer of the node's X into its threshold if that is exact; True if it did."""
    x = node.inputs[0]
    if len(x.inputs) != 1 or float(node.attrs.get("threshold", 0.0)) != 0.0:
        return False
    producer = x.inputs[0]
    if producer.domain not in (None, "", "ai.onnx"):
        return False
    if producer.op == "Sign":  # Sign(x) > 0 <=> x > 0, == 0 <=> x == 0 (NaN stays NaN)
        node.inputs[0] = producer.inputs[0]
        return True
    # x - c > 0 <=> x > c and x - c == 0 <=> x == c exactly in IEEE floats (gradual underflow);
    # likewise x + c against -c.
    candidates: list[tuple[int, float]] = []
    if producer.op == "Sub":
        candidates = [(0, 1.0)]
    elif producer.op == "Add":
        candidates = [(0, -1.0), (1, -1.0)]
    for data_index, factor in candidates:
        const = _scalar_constant(producer.inputs[1 - data_index])
        if const is None:
            continue
        node.attrs["threshold"] = float(np.float32(factor * const))
        node.inputs[0] = producer.inputs[data_index]
        return True
    return False


def fold_input_binarization(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold explicit Sign / scalar Sub / scalar Add in front of ``tod::BinaryConv2d`` nodes into them.

    Only exact folds: the node's threshold must be 0 before, and a Sub/Add constant a finite
    float32 scalar. Per-channel thresholds (a learned RSign) stay as a Sub in front of the node.
    """
    graph = gs.import_onnx(model)
    changed = False
    for node in graph.nodes:
        if node.op == OP_TYPE and node.domain == DOMAIN:
            while _fold_one(node):
                changed = True
    return _export_graph(graph, model) if changed else model
