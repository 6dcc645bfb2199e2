"""INT8: explicit QuantizeLinear/DequantizeLinear, laid out for the runtime that will run the file.

onnxruntime's QDQ quantizer writes the nodes (``quantize_static``, QuantFormat.QDQ), weights per output
channel, from ranges computed once by :func:`tod_deploy.quant.calibration.compute_ranges` and handed
over through its calibration cache (so the sensitivity pass and the final model share one calibration).
Two layouts (``--target``):

* ``tensorrt``: Q/DQ around Conv/MatMul/Gemm only, int8 activations and weights, both symmetric (zero
  point 0, which TensorRT requires), biases left in float (TensorRT's DequantizeLinear takes no int32;
  it fuses the float bias into the INT8 convolution itself). TensorRT chooses the rest of the fusion.
* ``onnxruntime``: what onnxruntime's CPU graph optimizer turns into integer kernels end to end:
  Q/DQ also around the ops between layers (Add, Mul, pooling, Resize, Concat, activations), so that
  DQ -> op -> Q groups become QLinearConv / QLinearAdd / QLinearConcat / ... and tensors stay uint8
  between them; uint8 activations with a zero point (asymmetric, MLAS's u8s8 kernels), int32 biases
  (QLinearConv takes them), and 7-bit weights (``reduce_range``) by default: on x86 without VNNI, MLAS
  multiplies u8 x s8 pairs into 16-bit sums (VPMADDUBSW) that saturate with full-range weights, so only
  7-bit weights give the same integers on every x86 CPU, with VNNI or without. ``--weight-bits 8`` trades
  that for accuracy on the CPUs that sum exactly (VNNI or AMX): SR-TOD's fidelity to FP32 rose from 92.1
  to 93.9 (128 held-out images, Xeon), at the same speed. onnxruntime has no integer ConvTranspose, so
  transposed convs are first rewritten as sub-pixel convs (:mod:`tod_deploy.quant.subpixel`).

``DeformConv`` (CFINet's RPN) stays float in both layouts: onnxruntime has no integer kernel for it. Rewriting
it as a depthwise DeformConv that only gathers the taps (float) and a 1x1 Conv over the 9x wider result
(QLinearConv) gave nothing: on trained CFINet at 512x512 (AMD EPYC, AVX2, 2 threads) the four DeformConvs
fell from 232 to 111 ms, but the 1x1 QLinearConvs over 2304 channels (+83 ms) and the transposes of those
columns to NHWC (+23 ms) took it back (716 -> 721 ms for the whole file), so no rewrite is made.
Nor for Linear layers on 3-D tensors, which export as MatMul + Add and so become QLinearMatMul + QLinearAdd
(the bias) rather than one QGemm with an int32 bias: quantizing after onnxruntime's own MatMulAddFusion
(``quant_pre_process``, Reshape -> Gemm -> Reshape) gave ThumbDet 4x 68.1 ms against 67.4 (512x512, same
EPYC, 2 threads, 40 rounds interleaved).
"""

from __future__ import annotations

import inspect
import logging
import re
import tempfile
from collections.abc import Callable, Container, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from tod_deploy.errors import UserError
from tod_deploy.export.passes import IR_VERSION
from tod_deploy.quant.graph import QUANTIZABLE_OPS

# Ops onnxruntime's CPU QDQ fusions run on integers (QLinear* kernels, or Q/DQ dropped around data movement).
ONNXRUNTIME_INT8_OPS = (
    *QUANTIZABLE_OPS, "Add", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Concat", "Relu",
    "Clip", "LeakyRelu", "Sigmoid", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split",
)  # fmt: skip


@dataclass(frozen=True)
class Int8Layout:
    """How the Q/DQ nodes of one target runtime are placed and typed (see the module docstring)."""

    target: str
    op_types: tuple[str, ...]
    activation_type: str  # onnxruntime.quantization.QuantType member name
    activation_symmetric: bool
    quantize_bias: bool
    reduce_range: bool
    sub_pixel: bool  # transposed convs rewritten as convs first (quant.subpixel): the runtime has no int8 one
    calibration: str  # the default --method (measured per layout: see quant.calibration)

    @property
    def weight_bits(self) -> int:
        return 7 if self.reduce_range else 8

    @property
    def exact_integer_sums(self) -> str:
        """Where onnxruntime's integer kernels compute what the file says (see the module docstring). It fuses
        the TensorRT layout's DQ -> Conv -> Q groups into them too, with that layout's 8-bit weights."""
        return "every x86 CPU" if self.reduce_range else "x86 CPUs with VNNI or AMX"

    @property
    def between_layers(self) -> bool:
        """Q/DQ also on the ops between layers: the runtime fuses each DQ -> op -> Q group."""
        return self.op_types != QUANTIZABLE_OPS

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "activations": f"{'int8 symmetric' if self.activation_symmetric else 'uint8 asymmetric'}",
            "weights": f"int{self.weight_bits} symmetric per channel",
            "exact_integer_sums": self.exact_integer_sums,
            "bias": "int32" if self.quantize_bias else "float",
            "op_types": list(self.op_types),
            "transposed_convs": "as sub-pixel convs" if self.sub_pixel else "as exported",
        }


INT8_LAYOUTS = {
    "tensorrt": Int8Layout("tensorrt", QUANTIZABLE_OPS, "QInt8", True, False, False, False, "entropy"),
    "onnxruntime": Int8Layout("onnxruntime", ONNXRUNTIME_INT8_OPS, "QUInt8", False, True, True, True, "mse"),
}


WEIGHT_BITS = (7, 8)
# /proc/cpuinfo flags of x86 instructions that sum u8 x s8 products into 32 bits without a 16-bit step
EXACT_SUM_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_layout(target: str, weight_bits: int | None = None) -> Int8Layout:
    """``target``'s layout, with ``weight_bits`` (7 or 8; onnxruntime only) instead of its default."""
    if target not in INT8_LAYOUTS:
        raise UserError(f"unknown INT8 target {target!r}", f"use --target {' or '.join(INT8_LAYOUTS)}")
    layout = INT8_LAYOUTS[target]
    if weight_bits is None or weight_bits == layout.weight_bits:
        return layout
    if weight_bits not in WEIGHT_BITS:
        raise UserError(f"--weight-bits {weight_bits} is not supported", "pass 7 or 8")
    if target != "onnxruntime":
        raise UserError(f"--target {target} takes 8-bit weights only", "drop --weight-bits or use --target onnxruntime")
    return replace(layout, reduce_range=weight_bits == 7)


def sidecar_weight_bits(sidecar: Mapping[str, Any]) -> int | None:
    """The bits of the INT8 weights a quantized file's sidecar records (``Int8Layout.to_dict``), None for none."""
    weights = str(((sidecar.get("quantization") or {}).get("layout") or {}).get("weights", ""))
    match = re.match(r"int(\d+) ", weights)
    return int(match.group(1)) if match else None


def eight_bit_sums_saturate(flags: AbstractSet[str]) -> bool:
    """Whether onnxruntime's integer kernels saturate sums of 8-bit weights on a CPU with these /proc/cpuinfo
    flags: an x86 CPU (it has a flags line) with none of ``EXACT_SUM_FLAGS``."""
    return bool(flags) and not any(flag in flags for flag in EXACT_SUM_FLAGS)


def eight_bit_sums_here(flags: AbstractSet[str]) -> str:
    """doctor's line on INT8 files with 8-bit weights on this CPU; empty where it is no x86 CPU."""
    if not flags:
        return ""
    if eight_bit_sums_saturate(flags):
        return "INT8 with 8-bit weights saturates here (no VNNI or AMX): keep quantize's default (--weight-bits 7)"
    return f"INT8 with 8-bit weights is exact here ({next(f for f in EXACT_SUM_FLAGS if f in flags)})"


def integer_sum_warning(sidecar: Mapping[str, Any], cpu_flags: Callable[[], AbstractSet[str]]) -> str | None:
    """A warning when an INT8 file with 8-bit weights (either layout) runs on an x86 CPU (``cpu_flags()`` as
    /proc/cpuinfo lists them: x86 only, empty elsewhere) that has none of ``EXACT_SUM_FLAGS``: its sums saturate.
    The flags are read only for such a file."""
    if sidecar_weight_bits(sidecar) != 8:
        return None
    if not eight_bit_sums_saturate(cpu_flags()):
        return None
    return (
        "warning: this INT8 file has 8-bit weights and this CPU has no VNNI or AMX: onnxruntime's integer kernels "
        "saturate 16-bit partial sums here, so results differ from the file's; for this CPU, quantize with --target "
        "onnxruntime --weight-bits 7"
    )


def qdq_quantize(
    model: onnx.ModelProto,
    ranges: Any,
    nodes_to_exclude: list[str] | None = None,
    nodes_to_quantize: list[str] | None = None,
    keep_float_inputs: list[str] | None = None,
    layout: Int8Layout = INT8_LAYOUTS["tensorrt"],
    int8_writers: list[str] | None = None,
) -> onnx.ModelProto:
    """A Q/DQ copy of ``model`` from precomputed ranges (onnxruntime TensorsData), in ``layout``.

    ``keep_float_inputs``: nodes that must read unquantized tensors (see :func:`unquantize_inputs`),
    except the outputs of the ``int8_writers`` layers, which they read as the INT8 layer writes them.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        raise UserError(
            f"onnxruntime {onnxruntime.__version__} cannot quantize from precomputed ranges",
            "upgrade it (tod-deploy's INT8 is verified with onnxruntime 1.31): pip install -U onnxruntime",
        )
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs "consider pre-processing" warnings on the root logger
    with tempfile.TemporaryDirectory(prefix="tod-quant-") as tmp:
        cache, out = Path(tmp) / "ranges.json", Path(tmp) / "model.int8.onnx"
        save_tensors_data(ranges, cache)
        try:
            quantize_static(
                model,
                str(out),
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(layout.op_types),
                per_channel=True,
                reduce_range=layout.reduce_range,
                activation_type=QuantType[layout.activation_type],
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes_to_quantize or None,
                nodes_to_exclude=nodes_to_exclude or None,
                calibrate_method=ranges.calibration_method,
                extra_options={
                    "ActivationSymmetric": layout.activation_symmetric,
                    "WeightSymmetric": True,
                    "QuantizeBias": layout.quantize_bias,
                },
                calibration_cache_path=str(cache),
            )
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(out))
    if keep_float_inputs:
        unquantize_inputs(quantized, set(keep_float_inputs), model, set(int8_writers or ()))
    quantized.ir_version = min(quantized.ir_version, IR_VERSION)
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    return quantized


def unquantize_inputs(
    model: onnx.ModelProto, names: set[str], source: onnx.ModelProto, int8_writers: Container[str] = ()
) -> int:
    """Make the ``names`` nodes read the float tensors themselves, not DequantizeLinear(QuantizeLinear(x)).

    The quantizer puts one Q/DQ pair on a tensor and hands its output to every consumer, so a node
    kept in FP32 (a tod node, an excluded layer, post-processing) that shares an input with a quantized
    layer would still see the rounded values. The onnxruntime layout's quantizer also removes a Relu or
    Clip whose input it quantizes (the QuantizeLinear's range clamps instead) and gives the layer before
    it the activation's output name; a float reader of that name would then read the values before the
    activation (measured: CFINet with its layer3 kept in FP32 fell from 0.92 to 0.54 INT8 fidelity), so
    the activation, taken from ``source`` (the model before quantization), is put back for the float
    readers alone. Tensors written by the ``int8_writers`` layers stay quantized for every reader: a
    float reader of a Conv's output would keep onnxruntime from running that Conv as QLinearConv.
    Returns the number of inputs rewired; Q/DQ nodes left without consumers are removed.
    """
    producer = {t: n for n in model.graph.node for t in n.output}
    source_producer = {t: n for n in source.graph.node for t in n.output}
    restored: dict[str, str] = {}
    rewired = 0
    for node in list(model.graph.node):
        if node.name not in names:
            continue
        for i, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # a quantized weight: only layers have those, and kept layers were not quantized
            writer = producer.get(q.input[0])
            if writer is not None and writer.name in int8_writers:
                continue
            if q.input[0] not in restored:
                restored[q.input[0]] = _float_tensor(model, q.input[0], producer, source_producer, source)
            node.input[i] = restored[q.input[0]]
            rewired += 1
    while True:
        used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        dead = [n for n in dead if not any(t in used for t in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {t for n in model.graph.node for t in n.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    return rewired


def _float_tensor(
    model: onnx.ModelProto,
    name: str,
    producer: dict[str, Any],
    source_producer: dict[str, Any],
    source: onnx.ModelProto,
) -> str:
    """``name`` as the unquantized model computes it: itself, or a restored copy of the Relu/Clip that
    the quantizer removed from in front of its QuantizeLinear (see :func:`unquantize_inputs`)."""
    activation, now = source_producer.get(name), producer.get(name)
    if activation is None or now is None or activation.name == now.name or activation.op_type not in ("Relu", "Clip"):
        return name
    copy = onnx.NodeProto()
    copy.CopyFrom(activation)
    copy.name, copy.input[0], copy.output[0] = f"{activation.name}_float", name, f"{name}_float"
    present = {i.name for i in model.graph.initializer}
    for init in source.graph.initializer:
        if init.name in copy.input[1:] and init.name not in present:
            model.graph.initializer.append(init)  # Clip's bounds, cleaned away with the removed node
    nodes = list(model.graph.node)
    model.graph.node.insert(nodes.index(now) + 1, copy)  # topological order: right after the writer
    return copy.output[0]


@dataclass
class QdqSummary:
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    quantized_layers: list[str] = field(default_factory=list)  # layers reading a DequantizeLinear output
    nonzero_zero_points: list[str] = field(default_factory=list)
    scales: dict[str, list[float]] = field(default_factory=dict)  # scale initializer -> values

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantize_nodes": self.quantize_nodes,
            "dequantize_nodes": self.dequantize_nodes,
            "quantized_layers": len(self.quantized_layers),
            "nonzero_zero_points": self.nonzero_zero_points,
        }


def qdq_summary(model: onnx.ModelProto) -> QdqSummary:
    """Which layers read dequantized inputs, the zero points (all must be 0) and every scale."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {
        n.output[0]: next(a.t for a in n.attribute if a.name == "value")
        for n in model.graph.node
        if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)
    }
    tensors = {**consts, **inits}
    summary = QdqSummary()
    dq_outputs = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type == "QuantizeLinear":
            summary.quantize_nodes += 1
        else:
            summary.dequantize_nodes += 1
            dq_outputs.add(node.output[0])
        scale = node.input[1]
        if scale in tensors:
            summary.scales[scale] = numpy_helper.to_array(tensors[scale]).astype(np.float64).ravel().tolist()
        if len(node.input) > 2 and node.input[2]:
            zp = tensors.get(node.input[2])
            if zp is not None and np.any(numpy_helper.to_array(zp) != 0):
                summary.nonzero_zero_points.append(node.input[2])
    # A layer computes in INT8 when its data and weight inputs (0 and 1) are both dequantized; a layer
    # kept in FP32 may still read a dequantized activation that it shares with a quantized neighbour.
    summary.quantized_layers = [
        n.name
        for n in model.graph.node
        if n.op_type in QUANTIZABLE_OPS and len(n.input) > 1 and all(t in dq_outputs for t in n.input[:2])
    ]
    return summary
