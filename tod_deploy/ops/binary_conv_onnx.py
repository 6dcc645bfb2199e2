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
  threshold in front of a ``tod::BinaryConv2d`` into the node, then :func:`fuse_epilogues` folds the
  ``Add`` (residual) and ``Relu``/``PRelu`` behind it into the node's epilogue (op version 2), which
  changes no bit and saves two passes over each output map. ``plugin-unfused`` stops before that.
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
from tod_deploy.ops.binary_conv_versions import NONE_INPUT
from tod_deploy.parity.decisions import EXPORT_PREFIX, EXPORTER_NODE_PREFIX, SLOPE_SUFFIX, module_of
from tod_deploy.recipes import BINARY_CONV_MODES

Mode = Literal["plugin", "plugin-unfused", "decompose"]
MODES: tuple[str, ...] = BINARY_CONV_MODES
_TOD = onnxscript.values.Opset(DOMAIN, VERSION)


def register_onnx_schema() -> None:
    """Make ``tod::BinaryConv2d`` versions 1 and 2 known to onnx (and so to onnxscript and the checker)
    in this process: the checker validates a node against the newest version its file imports."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    for version in (1, VERSION):
        onnx.defs.register_schema(_schema(version))


def _schema(version: int) -> OpSchema:
    attr = OpSchema.Attribute
    string, integer, floating = OpSchema.AttrType.STRING, OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [
        OpSchema.FormalParameter("X", "tensor(float)"),
        OpSchema.FormalParameter("W_packed", "tensor(uint8)"),
        OpSchema.FormalParameter("alpha", "tensor(float)"),
    ]
    attributes = [
        *(attr(name, string, "comma-separated ints") for name in LIST_ATTRS),
        attr("group", integer, "groups"),
        attr("in_channels", integer, "input channels"),
        attr("threshold", floating, "x > threshold -> +1"),
        attr("zero_sign", integer, "sign(0): +1, -1 or 0"),
        attr("pad_value", integer, "padding after the sign: 0, +1 or -1"),
    ]
    if version == 1:
        inputs.append(OpSchema.FormalParameter("bias", "tensor(float)", param_option=optional))
    else:
        inputs += [
            OpSchema.FormalParameter("bias", "tensor(float)"),
            OpSchema.FormalParameter("residual", "tensor(float)", "Y's shape, or empty for none"),
            OpSchema.FormalParameter("slope", "tensor(float)", "[Cout] for prelu, else empty"),
        ]
        attributes.append(attr("activation", string, "none, relu or prelu (after the residual)"))
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        version,
        doc="1-bit convolution; semantics in tod_deploy/ops/binary_conv_ref.py",
        inputs=inputs,
        outputs=[OpSchema.FormalParameter("Y", "tensor(float)")],
        attributes=attributes,
    )


def _translate_plugin(
    x: Any,
    w_packed: Any,
    alpha: Any,
    bias: Any,
    residual: Any,
    slope: Any,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    group: int,
    in_channels: int,
    threshold: float,
    zero_sign: int,
    pad_value: int,
    activation: str,
) -> Any:
    attrs = attrs_from_args(
        list(kernel_shape), list(strides), list(pads), list(dilations), group, in_channels, threshold, zero_sign,
        pad_value, activation,
    )  # fmt: skip
    return _TOD.BinaryConv2d(x, w_packed, alpha, bias, residual, slope, **attrs.to_onnx())


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: tod::binary_conv2d -> node."""
    register_onnx_schema()
    return {torch.ops.tod.binary_conv2d.default: _translate_plugin}


def prepare_for_export(model: nn.Module, mode: Mode) -> nn.Module:
    """A copy of ``model`` whose BinaryConv2d layers are in their ``mode`` deploy form (the original is untouched)."""
    if mode not in MODES:
        raise UserError(f"unknown binary-conv export mode {mode!r}", f"use --binary-conv {' or '.join(MODES)}")
    plugin = mode != "decompose"
    if isinstance(model, BinaryConv2d):
        return packed_from(model) if plugin else decomposed_from(model)
    prepared = copy.deepcopy(model)
    for name, module in list(prepared.named_modules()):
        if not isinstance(module, BinaryConv2d):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = prepared.get_submodule(parent_name) if parent_name else prepared
        setattr(parent, child, packed_from(module, name) if plugin else decomposed_from(module))
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
    """The graph passes an export in ``mode`` needs after ``torch.onnx.export`` (see module docstring)."""
    if mode == "decompose":
        return dequantized_sign_weights(model)
    folded = fold_input_binarization(model)
    return fuse_epilogues(folded) if mode == "plugin" else shared_empty_inputs(folded)


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
    for node in _binary_nodes(graph):
        while _fold_one(node):
            changed = True
    return _export_graph(graph, model) if changed else model


def _empty_input(graph: gs.Graph) -> gs.Constant:
    existing = [t for t in graph.tensors().values() if t.name == NONE_INPUT and isinstance(t, gs.Constant)]
    return existing[0] if existing else gs.Constant(NONE_INPUT, np.zeros((0,), dtype=np.float32))


def _is_empty(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and np.asarray(tensor.values).size == 0


def _binary_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [node for node in graph.nodes if node.op == OP_TYPE and node.domain == DOMAIN]


def shared_empty_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node's absent residual/slope -> one shared empty initializer (each layer exports its own)."""
    graph = gs.import_onnx(model)
    _share_empty_inputs(graph)
    return _export_graph(graph, model)


def _share_empty_inputs(graph: gs.Graph) -> None:
    empty = _empty_input(graph)
    for node in _binary_nodes(graph):
        for index in (4, 5):
            if index < len(node.inputs) and _is_empty(node.inputs[index]):
                node.inputs[index] = empty


def _only_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    """The single node reading ``tensor``, if nothing else (no other node, no graph output) does."""
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    consumer = tensor.outputs[0]
    return consumer if consumer.domain in (None, "", "ai.onnx") else None


def _channel_slopes(tensor: gs.Tensor, channels: int) -> np.ndarray | None:
    """PRelu's slope as ``channels`` values if it broadcasts along NCHW's channel axis only, else None."""
    values: np.ndarray | None = None
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
    elif len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant" and "value" in tensor.inputs[0].attrs:
        values = np.asarray(tensor.inputs[0].attrs["value"].values)
    if values is None or values.dtype != np.float32 or values.ndim > 4:
        return None
    shape = (1,) * (4 - values.ndim) + values.shape  # ONNX broadcasting aligns trailing axes
    if shape[0] != 1 or shape[2:] != (1, 1) or shape[1] not in (1, channels):
        return None
    return np.ascontiguousarray(np.broadcast_to(values.reshape(-1), (channels,)), dtype=np.float32)


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    return a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape) and len(a.shape) == 4


def _fuse_one(node: gs.Node, graph_outputs: set[str], constants: dict[str, gs.Constant]) -> None:
    """Fold ``-> Add(residual) -> Relu/PRelu`` (either part alone too) behind one node, where exact."""
    if node.attrs.get("activation", "none") != "none" or not _is_empty(node.inputs[4]):
        return
    out = node.outputs[0]
    channels = int(node.inputs[1].shape[0]) if node.inputs[1].shape else -1
    add = _only_consumer(out, graph_outputs)
    if add is not None and add.op == "Add" and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        same = _same_shape(other, out) and _same_shape(add.outputs[0], out)
        if other is not out and other.dtype == np.float32 and same:
            node.inputs[4] = other
            node.outputs[0] = add.outputs[0]
            add.inputs.clear()
            add.outputs.clear()
            out = node.outputs[0]
    act = _only_consumer(out, graph_outputs)
    if act is not None and act.op in ("Relu", "PRelu"):
        slopes = _channel_slopes(act.inputs[1], channels) if act.op == "PRelu" else None
        if act.op == "Relu" or slopes is not None:
            node.attrs["activation"] = act.op.lower()
            if slopes is not None:  # named after the PReLU's module when export named the node so
                named = act.name and not act.name.startswith(EXPORTER_NODE_PREFIX)
                path = module_of(act.name)
                name = f"{EXPORT_PREFIX}{path}{SLOPE_SUFFIX}" if named else f"{node.name or out.name}_slope"
                # a PReLU applied at every pyramid level is fused into one node per level: one initializer
                node.inputs[5] = constants.setdefault(name, gs.Constant(name, slopes))
            node.outputs[0] = act.outputs[0]
            act.inputs.clear()
            act.outputs.clear()


def fuse_epilogues(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold ``tod::BinaryConv2d -> Add -> PRelu/Relu`` chains into the node's fused epilogue (version 2).

    Exact (``binary_conv_ref`` step 6 is what ``Add`` then ``PRelu``/``Relu`` compute) and only where
    nothing else reads the intermediate tensors: the Add's other input must have the output's shape
    (no broadcasting) and a PRelu slope one value per output channel.
    """
    inferred = onnx.shape_inference.infer_shapes(model)  # the Add's inputs need known shapes
    graph = gs.import_onnx(inferred)
    _share_empty_inputs(graph)
    graph_outputs = {t.name for t in graph.outputs}
    constants: dict[str, gs.Constant] = {}
    for node in _binary_nodes(graph):
        _fuse_one(node, graph_outputs, constants)
    return _export_graph(graph, model)
