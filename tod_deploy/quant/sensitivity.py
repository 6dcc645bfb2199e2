"""Per-layer INT8 sensitivity: quantize one layer alone, measure how far the model's outputs move.

One calibration pass serves every layer: the model is quantized once with every layer included
(same ranges as the final model), and each single-layer variant is the FP32 model plus exactly
that layer's Q/DQ chain (its input activations' QuantizeLinear -> DequantizeLinear, its int8
weights and int32 bias with their DequantizeLinear) copied from the fully quantized model. This
is what TensorRT runs for the layer in INT8, with nothing else quantized.

Errors are relative RMS errors (||got - ref|| / ||ref||) on the calibration images: of the layer's
own output, and of the model's dense raw tensors (the worst of them is the sort key).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner
from tod_deploy.export.passes import expose_tensors
from tod_deploy.quant.activation_sqnr import TensorSqnr, exclude_pattern, low_sqnr

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class LayerSensitivity:
    node: str
    op_type: str
    role: str  # "stem", "last layer", "threshold", "--exclude", or "" (quantized by default)
    layer_error: float  # relative RMS error of the layer's own output
    output_error: float  # worst relative RMS error over the compared model tensors
    worst_output: str
    output_errors: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SensitivityReport:
    inputs: int
    compared: list[str]
    rows: list[LayerSensitivity] = field(default_factory=list)  # worst first
    measured: int = 0
    layers: int = 0
    tensors: list[TensorSqnr] = field(default_factory=list)  # the written file's activations, lowest SQNR first

    def suggested_excludes(self, top: int = 5) -> list[str]:
        """Regexes for the layers whose output error stands out: > 2x the median and > 1e-3, worst first."""
        errors = [r.output_error for r in self.rows]
        if not errors:
            return []
        bar = max(2.0 * float(np.median(errors)), 1e-3)
        picks = [r.node for r in self.rows if r.output_error > bar and not r.role]
        return [f"^{name}$" for name in picks[:top]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "compared": self.compared,
            "layers": self.layers,
            "measured": self.measured,
            "suggested_excludes": self.suggested_excludes(),
            "suggested_tensor_exclude": exclude_pattern(low_sqnr(self.tensors)),
            "rows": [r.to_dict() for r in self.rows],
            "tensors": [r.to_dict() for r in self.tensors],
        }


def relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    if ref.shape != got.shape:
        return float("inf")
    ref64, got64 = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    if not np.all(np.isfinite(got64)):
        return float("inf")
    return float(np.linalg.norm(got64 - ref64) / max(float(np.linalg.norm(ref64)), 1e-12))


def single_layer_model(fp32: onnx.ModelProto, full_q: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """``fp32`` with only ``layer``'s Q/DQ chain (taken from ``full_q``) in front of it."""
    q_nodes = {n.name: n for n in full_q.graph.node}
    producer = {t: n for n in full_q.graph.node for t in n.output}
    q_inits = {i.name: i for i in full_q.graph.initializer}
    fp32_tensors = {t for n in fp32.graph.node for t in n.output} | {i.name for i in fp32.graph.initializer}
    fp32_tensors |= {i.name for i in fp32.graph.input}
    target = q_nodes[layer]
    chain: list[onnx.NodeProto] = []
    needed: set[str] = set()
    stack = [t for t in target.input if t and t not in fp32_tensors]
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in q_inits:
            needed.add(tensor)
            continue
        node = producer.get(tensor)
        if node is None or node.op_type not in QDQ_OPS:
            raise ValueError(f"unexpected producer of {tensor!r} in the quantized model")
        chain.append(node)
        stack.extend(t for t in node.input if t and t not in fp32_tensors)
    order = {n.name: i for i, n in enumerate(full_q.graph.node)}
    chain.sort(key=lambda n: order[n.name])
    variant = onnx.ModelProto()
    variant.CopyFrom(fp32)
    nodes = []
    for node in variant.graph.node:
        if node.name == layer:
            nodes.extend(chain)
            replaced = onnx.NodeProto()
            replaced.CopyFrom(node)
            replaced.input[:] = list(target.input)
            nodes.append(replaced)
        else:
            nodes.append(node)
    del variant.graph.node[:]
    variant.graph.node.extend(nodes)
    variant.graph.initializer.extend(q_inits[name] for name in sorted(needed))
    return variant


def layer_sensitivity(
    fp32: onnx.ModelProto,
    full_q: onnx.ModelProto,
    layers: list[str],
    roles: dict[str, str],
    inputs: list[np.ndarray],
    compared: list[str],
    on_layer: Callable[[str], None] | None = None,
    total_layers: int | None = None,
) -> SensitivityReport:
    """Measure each of ``layers`` alone (see the module docstring); rows sorted worst first."""
    op_types = {n.name: n.op_type for n in fp32.graph.node}
    layer_out = {n.name: n.output[0] for n in fp32.graph.node if n.name in set(layers)}
    reference_runner = OnnxRuntimeRunner(expose_tensors(fp32, list(dict.fromkeys([*compared, *layer_out.values()]))))
    reference = [reference_runner.run(x) for x in inputs]
    del reference_runner
    n_inputs = len(inputs) * int(inputs[0].shape[0])
    report = SensitivityReport(inputs=n_inputs, compared=compared, layers=total_layers or len(layers))
    for layer in layers:
        variant = single_layer_model(fp32, full_q, layer)
        runner = OnnxRuntimeRunner(expose_tensors(variant, list(dict.fromkeys([*compared, layer_out[layer]]))))
        got = [runner.run(x) for x in inputs]
        del runner

        def err(name: str, got: list[dict[str, np.ndarray]] = got) -> float:
            ref_cat = np.concatenate([r[name].ravel() for r in reference])
            got_cat = np.concatenate([g[name].ravel() for g in got])
            return relative_error(ref_cat, got_cat)

        outputs = {name: err(name) for name in compared}
        worst = max(outputs, key=outputs.__getitem__) if outputs else ""
        report.rows.append(
            LayerSensitivity(
                layer,
                op_types[layer],
                roles.get(layer, ""),
                err(layer_out[layer]),
                outputs.get(worst, 0.0),
                worst,
                outputs,
            )  # fmt: skip
        )
        report.measured += 1
        if on_layer:
            on_layer(layer)
    report.rows.sort(key=lambda r: (-r.output_error, -r.layer_error, r.node))
    return report
