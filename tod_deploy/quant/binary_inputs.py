"""Which real-valued layers in front of a 1-bit model's binary layers may run in INT8: those whose
rounding keeps the signs the binary layers take.

A 1-bit layer binarizes its input, so INT8 rounding in the real layers in front of it (the
downsample shortcuts, the FPN whose maps feed 1-bit head towers) moves values that lie near the
threshold across it, and one flipped bit changes the next sums by 2 at k x k positions and flips
more bits further on. Each candidate layer is therefore checked alone and teacher-forced: the FP32
model with only that layer's Q/DQ (its input and weight chain, and its output's Q/DQ, as the INT8
file runs it), so its inputs are exact and only its own rounding moves signs; the signs are read
at the binary layers its values reach through no other binary layer's sign (later ones would count
the cascade, not the layer; a Bi-Real block's layer also adds its input back through its residual,
and the layers behind it are not counted either). A layer runs in INT8 when the share of flipped signs there is at most
the budget; the others stay FP32.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner
from tod_deploy.export.passes import expose_tensors
from tod_deploy.ops.binary_conv_ref import BinaryConvAttrs, binarize, is_binary_conv
from tod_deploy.quant.graph import SHAPE_OPS
from tod_deploy.quant.sensitivity import single_layer_model


@dataclass(frozen=True)
class SignCheck:
    layer: str
    flips: int  # signs that differ from FP32's at the binary inputs the layer reaches
    signs: int  # signs compared there
    binary_layers: int  # how many binary layers that is
    int8: bool  # within the budget: the layer runs in INT8

    @property
    def share(self) -> float:
        return self.flips / self.signs if self.signs else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"flips": self.flips, "signs": self.signs, "share": self.share,
                "binary_layers": self.binary_layers, "int8": self.int8}  # fmt: skip


def reached_binary_layers(model: onnx.ModelProto, layer: str) -> list[onnx.NodeProto]:
    """The binary layers whose sign input ``layer``'s values reach through no other binary layer's sign.

    A binary layer reached through its residual input (a fused epilogue) does not decide on those
    values; its output carries them on, so the walk continues behind it."""
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for t in node.input:
            if t:
                consumers[t].append(node)
    (start,) = [n for n in model.graph.node if n.name == layer]
    found: dict[str, onnx.NodeProto] = {}
    seen: set[str] = set()
    stack = list(start.output)
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node in consumers[tensor]:
            if node.op_type in SHAPE_OPS:
                continue
            if is_binary_conv(node) and node.input[0] == tensor:
                found[node.name] = node
                continue
            stack.extend(t for t in node.output if t)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    return sorted(found.values(), key=lambda n: order[n.name])


def with_output_qdq(variant: onnx.ModelProto, quantized: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """``variant`` with the QuantizeLinear/DequantizeLinear pair that ``quantized`` puts on ``layer``'s
    output, read by every reader of that output (the quantizer may have renamed the output to a Relu's
    it removed; the variant still has that Relu, and the pair goes behind it, as the runtime computes)."""
    (node,) = [n for n in quantized.graph.node if n.name == layer]
    q = next((n for n in quantized.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == node.output[0]), None)
    if q is None:
        return variant  # the layout leaves this layer's output in float
    dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    tensor = q.input[0]
    inits = {i.name: i for i in quantized.graph.initializer}
    pair = []
    for template, suffix in ((q, "_signcheck_q"), (dq, "_signcheck_dq")):
        copy = onnx.NodeProto()
        copy.CopyFrom(template)
        copy.name = f"{tensor}{suffix}"
        copy.output[0] = f"{tensor}{suffix}"
        pair.append(copy)
    pair[1].input[0] = pair[0].output[0]
    out = onnx.ModelProto()
    out.CopyFrom(variant)
    for reader in out.graph.node:
        reader.input[:] = [pair[1].output[0] if t == tensor else t for t in reader.input]
    writer = next(i for i, n in enumerate(out.graph.node) if tensor in n.output)
    out.graph.node.insert(writer + 1, pair[1])
    out.graph.node.insert(writer + 1, pair[0])
    present = {i.name for i in out.graph.initializer}
    needed = {t for n in pair for t in n.input[1:] if t in inits and t not in present}
    out.graph.initializer.extend(inits[t] for t in sorted(needed))
    return out


def check_signs(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    layers: list[str],
    inputs: list[np.ndarray],
    max_flips: float,
    on_layer: Callable[[str], None] | None = None,
) -> list[SignCheck]:
    """Each of ``layers`` quantized alone as ``quantized`` has it; the signs at the binary layers it
    reaches against FP32's on ``inputs`` (see the module docstring)."""
    reached = {layer: reached_binary_layers(model, layer) for layer in layers}
    binary = {node.name: node for nodes in reached.values() for node in nodes}
    decide = {name: BinaryConvAttrs.from_onnx(_attrs(node)) for name, node in binary.items()}

    def signs(variant: onnx.ModelProto, names: list[str]) -> dict[str, list[np.ndarray]]:
        """Per binary layer of ``names``: its input signs on each input, as ``variant`` computes them."""
        reads = {node.name: node.input[0] for node in variant.graph.node if node.name in set(names)}
        runner = OnnxRuntimeRunner(expose_tensors(variant, list(dict.fromkeys(reads.values()))))
        runs = [runner.run(x) for x in inputs]
        return {name: [binarize(run[reads[name]], decide[name].threshold, decide[name].zero_sign) for run in runs]
                for name in names}  # fmt: skip

    reference = signs(model, list(binary))
    checks = []
    for layer in layers:
        names = [node.name for node in reached[layer]]
        flips = total = 0
        if names:
            # the binary layers read the layer's output behind its Q/DQ, where the layout puts one
            got = signs(with_output_qdq(single_layer_model(model, quantized, layer), quantized, layer), names)
            for name in names:
                for mine, ref in zip(got[name], reference[name], strict=True):
                    flips += int(np.count_nonzero(mine != ref))
                    total += ref.size
        checks.append(SignCheck(layer, flips, total, len(names), flips <= max_flips * total))
        if on_layer:
            on_layer(layer)
    return checks


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
