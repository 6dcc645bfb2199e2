"""FP16: an autocast pass that keeps what FP16 cannot hold in FP32.

onnxconverter-common's ``convert_float_to_float16`` rewrites float tensors and initializers to
float16 and inserts Casts at the borders of the nodes it is told to leave alone
(``node_block_list``). We leave alone:

* the post-processing tail of every head (``graph.graph_roles``): box decoding, Exp/Log, anchor
  arithmetic, sigmoid/softmax, score thresholds, TopK, NonMaxSuppression, RoiAlign's coordinates;
* ``tod`` domain nodes (1-bit convolutions run in FP32, with Casts around them);
* large-range nodes: any node whose output exceeded ``FP16_SAFE`` in absolute value on the probe
  images (FP16 tops out at 65504; the margin covers inputs brighter than the probes), or whose
  float constants lie outside FP16's normal range (the converter would clamp them);
* nodes the user names with ``--exclude``.

The graph's inputs and outputs keep their float32 type (``keep_io_types``), so every runtime is fed
as before (deploy contract).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from tod_deploy.export.passes import IR_VERSION

FP16_SAFE = 1e4  # |value| above this on the probe images: keep the node in FP32
FP16_TINY = 6.1e-5  # nonzero constants below FP16's smallest normal lose precision


def large_range_nodes(model: onnx.ModelProto, ranges: Any | None) -> dict[str, float]:
    """Node name -> largest |value| seen in its float outputs (or constants) beyond FP16's comfort."""
    out: dict[str, float] = {}
    if ranges is not None:
        peak: dict[str, float] = {}
        for name in ranges.data:
            lo, hi = ranges.data[name].range_value
            peak[name] = float(max(abs(np.asarray(lo).max()), abs(np.asarray(hi).max())))
        for node in model.graph.node:
            worst = max((peak.get(t, 0.0) for t in node.output), default=0.0)
            if worst > FP16_SAFE:
                out[node.name] = worst
    inits = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for node in model.graph.node:
        for t in node.input:
            if t in inits:
                values = np.abs(numpy_helper.to_array(inits[t]))
                big = float(values.max(initial=0.0))
                tiny = values[(values > 0) & (values < FP16_TINY)]
                if big > FP16_SAFE or (tiny.size and tiny.size == np.count_nonzero(values)):
                    out[node.name] = max(out.get(node.name, 0.0), big)
    return out


def to_fp16(model: onnx.ModelProto, keep_fp32: list[str]) -> onnx.ModelProto:
    """float16 copy of ``model`` with ``keep_fp32`` nodes (by name) left in float32."""
    from onnxconverter_common import float16

    model = unshare_initializers(model, set(keep_fp32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model contains values out of fp16 range" for blocked nodes
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST),
            node_block_list=list(keep_fp32),
            max_finite_val=65504.0,
            min_positive_val=FP16_TINY,
        )
    drop_round_trips(converted)
    restore_tensor_names(converted, model)
    restore_fp32_outputs(converted, model)
    convert_fill_values(converted)
    converted.ir_version = min(converted.ir_version or IR_VERSION, IR_VERSION)
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    return converted


def drop_round_trips(converted: onnx.ModelProto) -> None:
    """Kept-FP32 readers of a kept-FP32 node's output read it in float32, not rounded to float16 and back (in place).

    The converter casts every output of a kept node to float16 and every input of a kept node back to
    float32, so a tensor between two kept nodes goes float32 -> float16 -> float32. Its clean-up
    (``remove_unnecessary_cast_node``) drops that pair only when the tensor has one reader (with more,
    it compares the Casts' ``to`` with 16 and 32, not with the type codes 10 and 1), and onnxruntime
    keeps such pairs since 1.17 (onnxconverter-common issue 271). So post-processing kept in FP32 (the
    RPN's proposals, box coordinates, scores) and the inputs of kept layers were rounded to FP16
    anyway: CFINet's FP16 file with every node kept reproduced 97.9% of FP32's detections.
    """
    graph = converted.graph
    typed = (*graph.value_info, *graph.input)
    float32 = {vi.name for vi in typed if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    outputs = {o.name for o in graph.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    nested = {t for n in graph.node for t in _subgraph_reads(n)}  # read inside If / Loop bodies: left alone
    narrowing = {n.output[0]: n for n in graph.node if cast_to(n) == onnx.TensorProto.FLOAT16 and n.input[0] in float32}
    widening = {
        n.output[0]: narrowing[n.input[0]].input[0]
        for n in graph.node
        if cast_to(n) == onnx.TensorProto.FLOAT and n.input[0] in narrowing and n.output[0] not in outputs | nested
    }
    if not widening:
        return
    kept = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in widening)]
    for node in kept:
        node.input[:] = [widening.get(t, t) for t in node.input]
    read = {t for n in kept for t in (*n.input, *_subgraph_reads(n))} | outputs
    kept = [n for n in kept if not (n.op_type == "Cast" and n.output[0] in narrowing and n.output[0] not in read)]
    gone = set(widening) | {t for t in narrowing if t not in read}
    del graph.node[:]
    graph.node.extend(kept)
    info = [vi for vi in graph.value_info if vi.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(info)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Tensors the subgraphs of a node (If / Loop bodies) read, their own included."""
    names: set[str] = set()
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for attr in node.attribute:
        for sub in (attr.g, *attr.graphs) if attr.type in subgraphs else ():
            for inner in sub.node:
                names |= set(inner.input) | _subgraph_reads(inner)
    return names


def restore_tensor_names(converted: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Give kept-FP32 nodes' outputs their original names back (in place).

    The converter renames the output X of a blocked node to ``<node>_output_cast_<i>`` and, where the
    next node is blocked too, drops the Cast that would have produced X again: named raw tensors
    (``pred_logits``, ...) would vanish, and ``verify`` exposes them by name.
    """
    produced = {t for node in converted.graph.node for t in node.output}
    before = {node.name: list(node.output) for node in original.graph.node}
    rename: dict[str, str] = {}
    for node in converted.graph.node:
        for i, out in enumerate(node.output):
            name = before.get(node.name, [])[i : i + 1]
            if name and out != name[0] and name[0] not in produced:
                rename[out] = name[0]
    if not rename:
        return
    for node in converted.graph.node:
        node.input[:] = [rename.get(t, t) for t in node.input]
        node.output[:] = [rename.get(t, t) for t in node.output]
    for vi in (*converted.graph.value_info, *converted.graph.output):
        vi.name = rename.get(vi.name, vi.name)


def unshare_initializers(model: onnx.ModelProto, keep_fp32: set[str]) -> onnx.ModelProto:
    """A copy where a kept-FP32 node has its own copy of each initializer it shares with a converted node.

    The converter turns a shared initializer into float16 and casts only value_info-typed inputs of
    kept nodes, which would leave a kept node reading a float16 constant beside float32 tensors.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {i.name: i for i in copy.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    converted_use = {t for n in copy.graph.node if n.name not in keep_fp32 for t in n.input if t in inits}
    for node in copy.graph.node:
        if node.name not in keep_fp32:
            continue
        for i, t in enumerate(node.input):
            if t in converted_use:
                twin = onnx.TensorProto()
                twin.CopyFrom(inits[t])
                twin.name = f"{t}__fp32__{node.name}"
                copy.graph.initializer.append(twin)
                node.input[i] = twin.name
    return copy


def convert_fill_values(converted: onnx.ModelProto) -> None:
    """A converted ConstantOfShape's fill value to float16 (in place).

    The converter declares the node's output float16 but leaves its ``value`` attribute float32, or absent
    (ONNX's default: a float32 zero), which onnxruntime refuses to load. The RoI extractor's zero tensor
    (left unfolded at export) is such a node."""
    declared = {vi.name: vi.type.tensor_type.elem_type for vi in converted.graph.value_info}
    for node in converted.graph.node:
        if node.op_type != "ConstantOfShape" or declared.get(node.output[0]) != onnx.TensorProto.FLOAT16:
            continue
        value = next((a for a in node.attribute if a.name == "value"), None)
        fill = np.zeros(1, np.float32) if value is None else numpy_helper.to_array(value.t)
        if fill.dtype == np.float32:
            if value is not None:
                node.attribute.remove(value)
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(fill.astype(np.float16))))


def restore_fp32_outputs(converted: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Graph outputs produced by kept-FP32 nodes back to float32 (in place).

    With ``keep_io_types`` the converter still casts such an output to float16 and declares it so.
    """
    want = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    for out in converted.graph.output:
        if want.get(out.name) != onnx.TensorProto.FLOAT or out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            continue
        cast = next((n for n in converted.graph.node if n.op_type == "Cast" and out.name in n.output), None)
        if cast is None:
            continue
        for attr in cast.attribute:
            if attr.name == "to":
                attr.i = onnx.TensorProto.FLOAT
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
