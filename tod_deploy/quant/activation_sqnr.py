"""How much of each activation survives its 8-bit QuantizeLinear in the written INT8 file (``quantize --report``).

Why: the per-layer sensitivity (``sensitivity.py``) quantizes one Conv/MatMul/Gemm's inputs and weights at a
time. A tensor is also quantized where an Add, Resize or Concat reads it, and there 8 bits can fail on their
own: a residual branch or an FPN sum whose few large values are 30-46x its RMS keeps at best 23-25 dB of
signal on a uniform 8-bit grid, whatever the calibration picks (measured on the trained CFINet, against
29.5 dB for its median tensor). So each activation the file quantizes is put through its own scale and zero
point, in the FP32 model on calibration images, and the signal-to-quantization-noise ratio is reported,
lowest first, with the nodes that must stay float for the tensor not to be quantized (its producer and
readers). Measured on that CFINet (32 held-out images, ``eval --fidelity``, 2-core Xeon): keeping the 22
tensors this marks float lifted fidelity from 92.8 to 95.5 (and the speed-up over FP32 from 1.66x down to
1.20x: their readers run float too), where the sensitivity report's five suggested layers left it at 92.8.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner
from tod_deploy.export.passes import expose_tensors

# A tensor this far below the median SQNR of the file's activations (8 dB: 1.3 bits) is suggested for keeping float.
MARGIN_DB = 8.0
# ONNX QuantizeLinear's output range per zero-point type (uint8 when the zero point is absent).
INTEGER_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


@dataclass(frozen=True)
class Quantizer:
    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def round_trip(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """QuantizeLinear then DequantizeLinear (round half to even, saturate), and which values saturated."""
        q = np.rint(x.astype(np.float64) / self.scale) + self.zero_point
        saturated = (q < self.qmin) | (q > self.qmax)
        return (np.clip(q, self.qmin, self.qmax) - self.zero_point) * self.scale, saturated


@dataclass
class TensorSqnr:
    tensor: str
    sqnr_db: float  # 10 log10(sum x^2 / sum (x - dq(q(x)))^2) over the images
    saturated: float  # share of values beyond the integer grid's ends
    scale: float
    zero_point: int
    nodes: list[str] = field(default_factory=list)  # producer and readers: --exclude these to keep it float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def activation_quantizers(quantized: onnx.ModelProto, fp32_tensors: set[str]) -> dict[str, Quantizer]:
    """Per-tensor QuantizeLinear parameters of the file's activations (tensors the FP32 model's nodes write)."""
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    found: dict[str, Quantizer] = {}
    for node in quantized.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in fp32_tensors or node.input[1] not in inits:
            continue
        scale = inits[node.input[1]]
        zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if scale.size != 1 or zero is None or zero.dtype not in INTEGER_RANGE:
            continue  # per-channel (weights) or a type this report does not model
        found[node.input[0]] = Quantizer(float(scale), int(zero), *INTEGER_RANGE[zero.dtype])
    return found


def activation_sqnr(fp32: onnx.ModelProto, quantized: onnx.ModelProto, inputs: list[np.ndarray]) -> list[TensorSqnr]:
    """Each activation ``quantized`` quantizes, through its own Q/DQ in the FP32 model on ``inputs``; lowest first."""
    writers = {t: n.name for n in fp32.graph.node for t in n.output}
    quantizers = activation_quantizers(quantized, set(writers))
    names = list(quantizers)
    if not names:
        return []
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    saturated = dict.fromkeys(names, 0)
    count = dict.fromkeys(names, 0)
    runner = OnnxRuntimeRunner(expose_tensors(fp32, names))
    for x in inputs:
        values = runner.run(x)
        for name in names:
            v = values[name].astype(np.float64)
            dq, sat = quantizers[name].round_trip(v)
            signal[name] += float(np.sum(v * v))
            noise[name] += float(np.sum((v - dq) ** 2))
            saturated[name] += int(sat.sum())
            count[name] += v.size
    del runner
    readers: dict[str, list[str]] = {}
    for node in fp32.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node.name)
    rows = [
        TensorSqnr(
            name,
            _db(signal[name], noise[name]),
            saturated[name] / max(count[name], 1),
            quantizers[name].scale,
            quantizers[name].zero_point,
            [writers[name], *dict.fromkeys(readers.get(name, []))],
        )
        for name in names
    ]
    rows.sort(key=lambda r: (r.sqnr_db, r.tensor))
    return rows


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-300) / noise))


def low_sqnr(rows: list[TensorSqnr], margin_db: float = MARGIN_DB) -> list[TensorSqnr]:
    """The tensors at least ``margin_db`` below the median SQNR of the file's activations, lowest first."""
    finite = [r.sqnr_db for r in rows if np.isfinite(r.sqnr_db)]
    if not finite:
        return []
    bar = float(np.median(finite)) - margin_db
    return [r for r in rows if r.sqnr_db <= bar]


def exclude_pattern(rows: list[TensorSqnr]) -> str | None:
    """One ``--exclude`` regex naming every node that keeps ``rows``' tensors float, or None for no rows."""
    nodes = list(dict.fromkeys(n for r in rows for n in r.nodes))
    return f"^({'|'.join(re.escape(n) for n in nodes)})$" if nodes else None
