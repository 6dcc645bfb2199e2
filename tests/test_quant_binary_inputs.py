"""INT8 for the real layers in front of a 1-bit model's binary layers, decided by the signs they keep.

The flip counts are checked against a NumPy reference of the INT8 arithmetic (QuantizeLinear's
round-half-to-even and clamp, per-channel weights, the int32 bias, the output's Q/DQ), computed from
the scales and zero points in the written file, not from the code that counts them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper
from test_quant import copy_export, dequantized, quantize

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner
from tod_deploy.export.passes import expose_tensors
from tod_deploy.export.pipeline import ExportResult
from tod_deploy.ops.binary_conv_ref import BinaryConvAttrs, binarize, is_binary_conv
from tod_deploy.ops.ort_segments import SegmentedSession
from tod_deploy.parity.comparator import verification_images
from tod_deploy.quant.binary_inputs import check_signs, reached_binary_layers
from tod_deploy.quant.int8 import qdq_summary
from tod_deploy.quant.pipeline import QuantizeResult


@pytest.fixture(scope="module")
def every_feeder_int8(dfr_plugin_small: ExportResult, tmp_path_factory: pytest.TempPathFactory) -> QuantizeResult:
    """DFR-Det FCOS, onnxruntime layout, with a budget every layer meets: all real feeders in INT8."""
    src = copy_export(dfr_plugin_small, tmp_path_factory.mktemp("dfr8"))
    return quantize(src, "int8", calib_size=2, target="onnxruntime", max_sign_flips=1.0)


def _op_counts(path: Path) -> Counter:
    """Node events per op type in one run's onnxruntime profile, through the runtime tod-deploy uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    session = SegmentedSession(onnx.load(str(path)), options)
    h, w = Sidecar.load(path).recipe.input_size
    session.run(None, {session.get_inputs()[0].name: np.full((1, 3, h, w), 100.0, np.float32)})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    return Counter(e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {}))


def _checks(result: QuantizeResult) -> dict[str, dict]:
    return result.sidecar["quantization"]["sign_check"]["layers"]


def test_feeders_run_on_integers_and_binary_layers_read_what_they_write(
    every_feeder_int8: QuantizeResult, dfr_plugin_small: ExportResult
) -> None:
    fp32 = onnx.load(str(dfr_plugin_small.onnx_path))
    checks = _checks(every_feeder_int8)
    assert len(checks) >= 10 and all(c["int8"] for c in checks.values())
    kept = every_feeder_int8.sidecar["quantization"]["kept_fp32"]
    assert kept["feeds a 1-bit layer"] == kept["stem"]  # the stem stays FP32 as the stem, in every model
    model = onnx.load(str(every_feeder_int8.output))
    assert set(qdq_summary(model).quantized_layers) == set(checks)
    # each feeder's output goes to one QuantizeLinear alone, the pattern onnxruntime fuses into QLinearConv
    # (a float reader of it would keep the Conv in float), and the binary layers it reaches read the values
    # dequantized from there, as the sign check measured them
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    producer = {t: n for n in model.graph.node for t in n.output}
    for layer in checks:
        (conv,) = [n for n in model.graph.node if n.name == layer]
        assert [n.op_type for n in consumers[conv.output[0]]] == ["QuantizeLinear"], layer
        assert all(producer[t].op_type == "DequantizeLinear" for t in conv.input[:2]), layer
    (p6,) = [n for n in fp32.graph.node if n.op_type == "Conv" and n.input[1].endswith("fpn_convs.4.conv.weight")]
    for tower in reached_binary_layers(fp32, p6.name):
        (now,) = [n for n in model.graph.node if n.name == tower.name]
        assert producer[now.input[0]].op_type == "DequantizeLinear"
    # and onnxruntime runs them so between the kernel's calls: its profiler names the integer kernels
    assert _op_counts(every_feeder_int8.output)["QLinearConv"] >= len(checks)
    # the shares are measurements: not all equal, and none beyond a few percent for a working layout
    shares = [c["share"] for c in checks.values()]
    assert len(set(shares)) > 1 and 0 < max(shares) < 0.05


def test_budget_decides_which_feeders_run_int8(
    every_feeder_int8: QuantizeResult, dfr_plugin_small: ExportResult, tmp_path: Path
) -> None:
    shares = {layer: c["share"] for layer, c in _checks(every_feeder_int8).items()}
    budget = float(np.median(list(shares.values())))
    result = quantize(
        copy_export(dfr_plugin_small, tmp_path), "int8", calib_size=2, target="onnxruntime", max_sign_flips=budget
    )
    int8 = {layer for layer, c in _checks(result).items() if c["int8"]}
    assert int8 == {layer for layer, share in shares.items() if share <= budget}
    assert 0 < len(int8) < len(shares)
    assert set(qdq_summary(onnx.load(str(result.output))).quantized_layers) == int8
    kept = result.sidecar["quantization"]["kept_fp32"]["feeds a 1-bit layer"]
    assert set(shares) - int8 <= set(kept)


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    windows = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]  # n c h w kh kw
    return np.einsum("nchwij,ocij->nohw", windows, w) + b.reshape(1, -1, 1, 1)


def test_flip_counts_match_a_numpy_reference(every_feeder_int8: QuantizeResult, dfr_plugin_small: ExportResult) -> None:
    """The FPN's P6 conv (3x3, stride 2) feeds two head towers' first binary layers directly."""
    fp32 = onnx.load(str(dfr_plugin_small.onnx_path))
    q = onnx.load(str(every_feeder_int8.output))
    (p6,) = [n for n in fp32.graph.node if n.op_type == "Conv" and n.input[1].endswith("fpn_convs.4.conv.weight")]
    towers = reached_binary_layers(fp32, p6.name)
    assert len(towers) == 2 and all(is_binary_conv(t) and t.input[0] == p6.output[0] for t in towers)
    recipe = every_feeder_int8.sidecar.recipe
    inputs = [verification_images(recipe, 1, seed) for seed in (0, 1)]
    (check,) = check_signs(fp32, q, [p6.name], inputs, 1.0)

    consts = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {t: n for n in q.graph.node for t in n.output}
    (conv,) = [n for n in q.graph.node if n.name == p6.name]
    dq_x, dq_w, dq_b = (producer[t] for t in conv.input[:3])
    (q_out,) = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0]]
    w = consts[dq_w.input[0]].astype(np.float64) * consts[dq_w.input[1]].reshape(-1, 1, 1, 1)
    b = consts[dq_b.input[0]].astype(np.float64) * consts[dq_b.input[1]]
    runner = OnnxRuntimeRunner(expose_tensors(fp32, [p6.input[0], p6.output[0]]))
    flips = signs = 0
    for images in inputs:
        got = runner.run(images)
        x = dequantized(got[p6.input[0]].astype(np.float64), consts[dq_x.input[1]], consts[dq_x.input[2]])
        y = _conv(x, w, b, stride=2, pad=1)
        y = dequantized(y, consts[q_out.input[1]], consts[q_out.input[2]])
        for tower in towers:
            attrs = BinaryConvAttrs.from_onnx({a.name: onnx.helper.get_attribute_value(a) for a in tower.attribute})
            ref = binarize(got[p6.output[0]], attrs.threshold, attrs.zero_sign)
            flips += int(np.count_nonzero(binarize(y.astype(np.float32), attrs.threshold, attrs.zero_sign) != ref))
            signs += ref.size
    assert check.signs == signs and check.binary_layers == 2
    assert flips > 0
    # float32 against float64 sums may round a value at a rounding step's midpoint either way
    assert abs(check.flips - flips) <= max(2, 0.02 * flips), (check.flips, flips)
