"""Graph surgery after export (onnx-graphsurgeon): fold, clean, name, annotate.

The raw head outputs are exported as graph outputs so they carry stable names; unless the user
asked for a ``--raw`` export they are then dropped from the outputs but stay in the graph as
named tensors, which ``verify`` exposes again (as Polygraphy's "mark outputs" does).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tod_deploy.errors import UserError

# onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13, TensorRT 11 at most 10.
IR_VERSION = 10
# A filled tensor larger than this stays a ConstantOfShape node instead of being folded into the file.
FILL_FOLD_LIMIT_BYTES = 1 << 20


gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def clean_graph(model: onnx.ModelProto, keep_outputs: list[str], metadata: dict[str, object]) -> onnx.ModelProto:
    import onnxruntime  # graph-surgeon folds constants with it; keep its optimizer chatter out of the CLI

    onnxruntime.set_default_logger_severity(3)
    graph = gs.import_onnx(model)
    graph.fold_constants(should_exclude_node=is_large_fill).cleanup().toposort()
    by_name = {t.name: t for t in graph.outputs}
    graph.outputs = [by_name[name] for name in keep_outputs]
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=True)
    out.ir_version = min(model.ir_version, IR_VERSION)
    out.producer_name, out.producer_version = "tod-deploy", str(metadata.get("tod_deploy_version", ""))
    del out.metadata_props[:]
    for key, value in metadata.items():
        entry = out.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    return out


def is_large_fill(node: gs.Node) -> bool:
    """A ConstantOfShape whose output would exceed ``FILL_FOLD_LIMIT_BYTES``.

    The RoI extractor scatters each level's pooled maps into a zero tensor of [RoIs, C, 7, 7]: folded, it
    was 150 MB of zeros in SR-TOD's file (3000 RoIs, 256 channels; 321 MB instead of 171 MB). The node
    fills it at run time in milliseconds. Smaller fills (pads, shapes) still fold, as TensorRT wants
    them as constants."""
    if node.op != "ConstantOfShape" or not isinstance(node.inputs[0], gs.Constant):
        return False
    count = int(np.prod(node.inputs[0].values)) if node.inputs[0].values.size else 1
    value = node.attrs.get("value")
    itemsize = value.values.dtype.itemsize if isinstance(value, gs.Constant) else 4
    return count * itemsize > FILL_FOLD_LIMIT_BYTES


def expose_tensors(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model with intermediate tensors added as outputs (for parity checks)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    produced = {name for node in copy.graph.node for name in node.output}
    for name in names:
        if name in present:
            continue
        if name not in produced:
            raise UserError(f"the ONNX file has no tensor named {name!r}", "re-export it with this tod-deploy")
        copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
