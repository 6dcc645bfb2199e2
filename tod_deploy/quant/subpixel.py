"""Transposed convolutions as sub-pixel convolutions, so that onnxruntime runs them on integers.

onnxruntime's CPU provider has no integer ConvTranspose: inside Q/DQ it dequantizes, runs the float
kernel and quantizes again, slower than plain FP32 (measured: 256 -> 128 channels, kernel 4, stride 2,
128x128 input, 2 threads: 140 ms FP32, 163 ms with Q/DQ around it). A ConvTranspose whose output is
exactly ``stride`` times its input is ``stride**2`` ordinary convolutions over the input, one per output
phase, interleaved by DepthToSpace (the sub-pixel form). Output phase ``r`` of an axis takes the taps
``k = k0 + stride * j`` with ``k0 = (r + pad_begin) mod stride``, from input offsets ``d0 - j``, where
``d0 = (r + pad_begin) div stride``. Each phase is then a Conv that onnxruntime runs as QLinearConv: the
same shape at 85 ms in INT8, 140 ms in FP32 (the same as the ConvTranspose), with FP32 values equal to
float rounding (1.9e-6 on outputs of magnitude ~10).

Only the onnxruntime INT8 layout uses this: TensorRT runs deconvolutions in INT8 itself. No library we
use offers the rewrite (onnxruntime's quantizer, onnx-graphsurgeon, onnxconverter-common), hence ours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """An attribute's value as onnx.helper decodes it, or ``default`` where the node omits it."""
    attr = next((a for a in node.attribute if a.name == name), None)
    return helper.get_attribute_value(attr) if attr is not None else default


def phase_plan(kernel: int, stride: int, pad_begin: int, pad_end: int) -> list[tuple[list[int], int, int]] | None:
    """Per output phase of one axis: its kernel taps in correlation order and the Conv's pads (begin, end).

    None when the transposed conv is not an exact sub-pixel upsampling (output = stride x input, every
    phase with the same number of taps, no negative pads)."""
    if kernel % stride or kernel - pad_begin - pad_end != stride:
        return None
    taps = kernel // stride
    plan = []
    for phase in range(stride):
        first, offset = (phase + pad_begin) % stride, (phase + pad_begin) // stride
        if offset > taps - 1:
            return None
        # input offsets offset - (taps - 1) ... offset, in increasing order: the taps descend
        plan.append(([first + stride * (taps - 1 - t) for t in range(taps)], taps - 1 - offset, offset))
    return plan


def split_transposed_convs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with each exact sub-pixel ConvTranspose as phase Convs + Concat + DepthToSpace,
    and the names of the rewritten nodes. The DepthToSpace keeps the original output tensor's name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {i.name: i for i in out.graph.initializer}  # converted to arrays only where rewritten
    nodes: list[onnx.NodeProto] = []
    rewritten: list[str] = []
    for node in out.graph.node:
        plan = _sub_pixel_plan(node, weights)
        if plan is None:
            nodes.append(node)
            continue
        rows, cols, stride = plan
        w = numpy_helper.to_array(weights[node.input[1]])  # [C_in, C_out, kH, kW]
        bias = list(node.input[2:3])
        phases = []
        for ry, (row_taps, top, bottom) in enumerate(rows):
            for rx, (col_taps, left, right) in enumerate(cols):
                name = f"{node.name}/phase{ry}{rx}"
                kernel = np.ascontiguousarray(w[:, :, row_taps][:, :, :, col_taps].transpose(1, 0, 2, 3))
                out.graph.initializer.append(numpy_helper.from_array(kernel, f"{name}.weight"))
                phases.append(f"{name}_output")
                nodes.append(helper.make_node(
                    "Conv", [node.input[0], f"{name}.weight", *bias], [phases[-1]], name=name,
                    kernel_shape=list(kernel.shape[2:]), pads=[top, left, bottom, right],
                ))  # fmt: skip
        nodes.append(helper.make_node("Concat", phases, [f"{node.name}/phases"], name=f"{node.name}/concat", axis=1))
        nodes.append(helper.make_node(
            "DepthToSpace", [f"{node.name}/phases"], list(node.output), name=node.name, blocksize=stride, mode="DCR"
        ))  # fmt: skip
        rewritten.append(node.name)
    if rewritten:
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        used = {t for n in out.graph.node for t in n.input}
        kept = [i for i in out.graph.initializer if i.name in used]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)
    return out, rewritten


def _sub_pixel_plan(
    node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]
) -> tuple[list[tuple[list[int], int, int]], list[tuple[list[int], int, int]], int] | None:
    """Row and column phase plans and the stride, or None where the node is not an exact 2D sub-pixel
    upsampling with constant weights, one group, no dilation and no output padding or shape."""
    if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx") or node.input[1] not in weights:
        return None
    dims = list(weights[node.input[1]].dims)
    auto_pad = _attribute(node, "auto_pad", b"NOTSET")
    shaped = any(a.name == "output_shape" for a in node.attribute)
    if len(dims) != 4 or _attribute(node, "group", 1) != 1 or auto_pad != b"NOTSET" or shaped:
        return None
    if any(d != 1 for d in _attribute(node, "dilations", [1, 1])) or any(_attribute(node, "output_padding", [0, 0])):
        return None
    kernel = _attribute(node, "kernel_shape", dims[2:])
    strides = _attribute(node, "strides", [1, 1])
    pads = _attribute(node, "pads", [0, 0, 0, 0])
    if strides[0] != strides[1] or strides[0] < 2:
        return None
    rows = phase_plan(kernel[0], strides[0], pads[0], pads[2])
    cols = phase_plan(kernel[1], strides[1], pads[1], pads[3])
    if rows is None or cols is None:
        return None
    return rows, cols, strides[0]
