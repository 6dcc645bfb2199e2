"""``tod::BinaryConv2d`` version 1 files, read as version 2 (see ``binary_conv_ref``).

Why a rewrite on load and not two op versions in every runtime: onnxruntime-extensions' Python
hook registers one signature per op type (no optional inputs, no version ranges), and TensorRT's
Python plugin layer one per plugin name. A version-1 node means exactly version 2 with no residual
and no activation, so :func:`upgrade_to_v2` gives it the two empty inputs and ``activation="none"``;
every runtime then sees one signature. Torch-free, so sessions and engine builds can call it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tod_deploy.errors import UserError
from tod_deploy.ops.binary_conv_ref import DOMAIN, INPUTS, OP_TYPE, VERSION, is_binary_conv

NONE_INPUT = "tod_epilogue_none"  # the empty float32 initializer that stands for "no residual / no slope"


def domain_version(model: onnx.ModelProto) -> int | None:
    """The ``tod`` opset the file imports (None without one)."""
    return next((op.version for op in model.opset_import if op.domain == DOMAIN), None)


def _binary_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if is_binary_conv(node)]


def needs_upgrade(model: onnx.ModelProto) -> bool:
    return any(len(node.input) < len(INPUTS) for node in _binary_nodes(model))


def upgrade_to_v2(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose version-1 ``tod::BinaryConv2d`` nodes are version 2 (or ``model`` itself).

    A node without ``bias`` (the schema allowed it, exports always wrote zeros) gets zeros sized
    from its ``W_packed`` initializer.
    """
    if not needs_upgrade(model):
        return model
    upgraded = onnx.ModelProto()
    upgraded.CopyFrom(model)
    graph = upgraded.graph
    initializers = {init.name: init for init in graph.initializer}
    if NONE_INPUT not in initializers:
        graph.initializer.append(numpy_helper.from_array(np.zeros((0,), dtype=np.float32), NONE_INPUT))
    for node in _binary_nodes(upgraded):
        if len(node.input) < 3:
            raise UserError(
                f"tod::{OP_TYPE} node {node.name!r} has {len(node.input)} inputs, fewer than X, W_packed and alpha",
                "re-export the model with tod-deploy export",
            )
        if len(node.input) == 3 or node.input[3] == "":
            packed = initializers.get(node.input[1])
            if packed is None:
                raise UserError(
                    f"tod::{OP_TYPE} node {node.name!r} has no bias and its W_packed is not stored",
                    "re-export the model with tod-deploy export",
                )
            name = f"{node.name or node.output[0]}_bias_zeros"
            graph.initializer.append(numpy_helper.from_array(np.zeros(packed.dims[0], dtype=np.float32), name))
            del node.input[3:]
            node.input.append(name)
        while len(node.input) < len(INPUTS):
            node.input.append(NONE_INPUT)
        if not any(attr.name == "activation" for attr in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("activation", "none"))
    for op in upgraded.opset_import:
        if op.domain == DOMAIN:
            op.version = VERSION
    return upgraded
