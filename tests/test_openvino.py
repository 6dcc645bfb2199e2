"""OpenVINO as a backend: the real runtime (the ``openvino`` extra) reading our files through its ONNX frontend.

The 1-bit layers are checked bit-exactly on their integer sums against the NumPy reference over the op's
case grid (native BinaryConvolution where OpenVINO can express the case, the decomposed fallback where it
cannot); the five methods' exports against PyTorch through the same parity check as onnxruntime; and
bench, eval and verify as a user runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends import ExportSource, RunnerOptions, open_runner
from tod_deploy.backends.onnxruntime_runner import load_onnx
from tod_deploy.backends.openvino_ops import BinaryLayers, binarization_bounds, native_fallback_reason
from tod_deploy.backends.openvino_runner import OpenVINORunner, compile_config
from tod_deploy.errors import UserError
from tod_deploy.evaluation.coco_eval import detections_as_ground_truth
from tod_deploy.evaluation.synthetic import generate_synthetic
from tod_deploy.export.pipeline import ExportResult, rebuild_deploy_model
from tod_deploy.export.verify import verify_onnx
from tod_deploy.ops.binary_conv_cases import (
    ACTIVATION_CASES,
    GEOMETRIES,
    Geometry,
    case_id,
    epilogue_inputs,
    make_inputs,
    sign_pairs,
)
from tod_deploy.ops.binary_conv_ref import VERSION, BinaryConvAttrs, binary_conv2d_ref, binary_conv2d_sums, pack_weights

openvino = pytest.importorskip("openvino", reason="OpenVINO is the test extra's: pip install -e '.[test]'")
CAPABILITIES = list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))

# Cases OpenVINO runs natively (channels a multiple of 8, no groups), with the geometry the CPU kernel's grid
# varies: strides, dilations, asymmetric pads, 1x1 and 5x5, nonzero thresholds, two 64-bit words per tap.
NATIVE_GEOMETRIES = [
    Geometry(64, 16, 7, 9, stride=2, threshold=0.5),
    Geometry(24, 8, 10, 11, dilation=2, pads=(2, 2, 2, 2), threshold=-0.25),
    Geometry(72, 9, 8, 9, stride=2, dilation=2, pads=(0, 1, 2, 3)),
    Geometry(8, 12, 6, 41, k=1, pads=(0, 0, 0, 0), threshold=0.25),
    Geometry(16, 8, 5, 37, k=5, pads=(2, 2, 2, 2), ties=False),
    Geometry(128, 16, 5, 6),
]


def one_node_model(
    attrs: BinaryConvAttrs,
    w: np.ndarray,
    alpha: np.ndarray,
    bias: np.ndarray,
    shape: tuple[int, ...],
    residual: np.ndarray | None = None,
    slope: np.ndarray | None = None,
) -> onnx.ModelProto:
    """One ``tod::BinaryConv2d`` node as export writes it: six inputs, the residual a graph input when given."""
    empty = np.zeros(0, np.float32)
    inits = [
        numpy_helper.from_array(pack_weights(w, attrs.zero_sign), "W_packed"),
        numpy_helper.from_array(alpha, "alpha"),
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(slope if slope is not None else empty, "slope"),
    ]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(shape))]
    if residual is not None:
        inputs.append(helper.make_tensor_value_info("residual", TensorProto.FLOAT, list(residual.shape)))
    else:
        inits.append(numpy_helper.from_array(empty, "residual"))
    node = helper.make_node("BinaryConv2d", ["X", "W_packed", "alpha", "bias", "residual", "slope"], ["Y"],
                            domain="tod", **attrs.to_onnx())  # fmt: skip
    graph = helper.make_graph([node], "bconv", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tod", VERSION)])
    model.ir_version = 10
    return model


def run_one(model: onnx.ModelProto, *feeds: np.ndarray) -> tuple[np.ndarray, BinaryLayers]:
    runner = OpenVINORunner(model, threads=2, precision="fp32")
    out = runner.request.infer(list(feeds))  # a second graph input (the residual) goes by position
    return np.array(out.to_tuple()[0]), runner.binary_layers


@pytest.mark.parametrize("geo", GEOMETRIES + NATIVE_GEOMETRIES, ids=case_id)
def test_binary_layers_are_bit_exact_natively_or_decomposed(geo: Geometry) -> None:
    """alpha = 1, bias = 0: the output is the integer sum S itself, which must equal the reference's."""
    x, w, _, _ = make_inputs(geo)
    ones, zeros = np.ones(geo.cout, np.float32), np.zeros(geo.cout, np.float32)
    for zero_sign, pad_value in sign_pairs():
        attrs = geo.attrs(zero_sign, pad_value)
        got, layers = run_one(one_node_model(attrs, w, ones, zeros, x.shape), x)
        np.testing.assert_array_equal(got, binary_conv2d_sums(x, w, attrs), err_msg=f"{zero_sign=} {pad_value=}")
        reason = native_fallback_reason(attrs)
        assert (layers.native, dict(layers.fallbacks)) == ((1, {}) if reason is None else (0, {reason: 1}))


def test_native_path_covers_the_grid_it_claims() -> None:
    native = [(g, z) for g in GEOMETRIES + NATIVE_GEOMETRIES for z in (-1, 1) if native_fallback_reason(g.attrs(z, 0))]
    assert len(native) < len(GEOMETRIES + NATIVE_GEOMETRIES) * 2 - 12  # most cases run natively, not decomposed
    assert native_fallback_reason(Geometry(34, 18, 7, 7, group=2).attrs(-1, 0)).startswith("group=2")
    assert native_fallback_reason(Geometry(64, 8, 5, 5).attrs(0, 0)).startswith("zero_sign=0")
    assert "multiples of 8" in native_fallback_reason(Geometry(17, 8, 5, 5).attrs(-1, 0))
    for t in (0.0, 0.5, -0.25, 1e-40):  # the bounds straddle t with a normal-float width (the plugin flushes)
        low, high = binarization_bounds(t, -1)
        assert low == np.float32(t) < high and abs(high - low) >= np.finfo(np.float32).tiny
        low, high = binarization_bounds(t, 1)
        assert low < high == np.float32(t) and abs(high - low) >= np.finfo(np.float32).tiny


@pytest.mark.parametrize("activation", ACTIVATION_CASES)
def test_the_fused_epilogue(activation: str) -> None:
    """alpha, bias, residual and activation on the native path, to float tolerance of the reference."""
    geo = NATIVE_GEOMETRIES[0]
    x, w, alpha, bias = make_inputs(geo)
    attrs = geo.attrs(-1, 0)
    attrs = replace(attrs, activation=activation)
    sums, y = binary_conv2d_ref(x, w, alpha, bias, geo.attrs(-1, 0))
    residual, slope = epilogue_inputs(y, activation)
    _, expected = binary_conv2d_ref(x, w, alpha, bias, attrs, residual=residual, slope=slope)
    got, layers = run_one(one_node_model(attrs, w, alpha, bias, x.shape, residual, slope), x, residual)
    assert layers.native == 1
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


def test_precision_choices_are_checked_before_compiling() -> None:
    assert compile_config("fp32", 2, ["FP32"])["INFERENCE_PRECISION_HINT"] == "f32"
    assert "INFERENCE_PRECISION_HINT" not in compile_config("auto", 2, ["FP32"])  # OpenVINO's own default
    assert compile_config("bf16", 2, ["FP32", "BF16"])["INFERENCE_PRECISION_HINT"] == "bf16"
    with pytest.raises(UserError, match="no native BF16"):
        compile_config("bf16", 2, ["FP32", "INT8", "BIN"])
    with pytest.raises(UserError, match="unknown precision"):
        compile_config("int4", 2, ["FP32"])
    # 1-bit layers: OpenVINO's BinaryConvolution compiles in float32 only (bf16 failed on a Xeon with AMX)
    assert compile_config("auto", 2, ["FP32", "BF16"], binary=True)["INFERENCE_PRECISION_HINT"] == "f32"
    with pytest.raises(UserError, match="BinaryConvolution in bfloat16"):
        compile_config("bf16", 2, ["FP32", "BF16"], binary=True)


def test_without_openvino_is_one_line(monkeypatch: pytest.MonkeyPatch, small_onnx: Path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # what a machine without the extra has
    with pytest.raises(UserError, match="OpenVINO is not installed") as info:
        open_runner("openvino", ExportSource(small_onnx, Sidecar.load(small_onnx)))
    assert "tod-deploy[openvino]" in info.value.fix


def test_a_file_openvino_refuses_is_one_line(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="elsewhere")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UserError, match="OpenVINO cannot read the model .*NoSuchOp"):
        OpenVINORunner(model, threads=1)


# ----------------------------------------------------------------------------- the five methods


@pytest.mark.parametrize("export", ["small_export", "sr_tod_small", "small_cfinet", "dfr_plugin_small", "bh_small"])
def test_every_method_matches_pytorch_on_openvino(export: str, request: pytest.FixtureRequest) -> None:
    """The parity check of export, with OpenVINO in onnxruntime's place: dense tensors, decisions teacher-forced,
    detections. CFINet reads through the DeformConv rule, DFR-Det's 1-bit layers as BinaryConvolution."""
    result: ExportResult = request.getfixturevalue(export)
    sidecar = Sidecar.load(result.onnx_path)
    deploy = rebuild_deploy_model(sidecar, lambda _line: None)
    model = load_onnx(result.onnx_path)  # one seeded input (export checks three on onnxruntime)
    report = verify_onnx(model, deploy, sidecar.recipe, seeds=(0,), threads=2, backend="openvino", precision="fp32")
    assert report.backend == "openvino" and report.ok, report.failure()
    if export == "dfr_plugin_small":
        source = ExportSource(result.onnx_path, result.sidecar)
        runner = open_runner("openvino", source, RunnerOptions(threads=2, precision="fp32", log=lambda _l: None))
        nodes = sum(n.op_type == "BinaryConv2d" for n in source.onnx_model().graph.node)
        assert runner.binary_layers.native == nodes > 10 and not runner.binary_layers.fallbacks


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tod_deploy.cli", *args], capture_output=True, text=True, timeout=600)


def test_bench_and_verify_commands(dfr_plugin_small: ExportResult, small_onnx: Path, tmp_path: Path) -> None:
    model = str(dfr_plugin_small.onnx_path)
    proc = run("bench", model, "--backend", "onnxruntime,openvino", "--iters", "2", "--warmup", "1", "--threads", "2",
               "--json", str(tmp_path / "bench.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["results"]) == {"onnxruntime", "openvino"} and result["results"]["openvino"]["fps"] > 0
    ran = result["runtimes"]["openvino"]
    assert ran["precision"] == "fp32" and ran["binary_layers"]["native"] > 10  # auto: float32 with 1-bit layers
    assert "openvino (fp32)" in proc.stdout

    verified = str(small_onnx)  # ThumbDet: the quickest to rebuild in PyTorch
    proc = run("verify", verified, "--backend", "openvino", "--threads", "2", "--json", str(tmp_path / "verify.json"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "verify.json").read_text())["backend"] == "openvino"
    proc = run("bench", model, "--backend", "openvino", "--precision", "bf16", "--iters", "1")
    refusal = "no native BF16" if "BF16" not in CAPABILITIES else "BinaryConvolution in bfloat16"
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and refusal in proc.stderr
    proc = run("verify", model, "--backend", "tensorrt")
    assert proc.returncode == 2 and "use --backend onnxruntime or openvino" in proc.stderr


def test_eval_rows_agree_with_onnxruntime(small_onnx: Path, tmp_path: Path) -> None:
    """`eval --backend onnxruntime,openvino` with the FP32 model's own detections as labels: real AP50 on both
    rows, OpenVINO's within 0.1 point of onnxruntime's, and its fidelity to onnxruntime's detections ~1."""
    from tod_deploy.evaluation.run import evaluate_model

    root = tmp_path / "set"
    generate_synthetic(root, images=2, seed=5, size_hw=(240, 320))
    ann, images = root / "annotations.json", root / "images"
    fp32 = evaluate_model(small_onnx, ann, images, class_agnostic=True, log=lambda _l: None)
    truth = detections_as_ground_truth(json.loads(ann.read_text()), fp32.detections["onnxruntime"], 0.0)
    assert truth["annotations"]
    labels = tmp_path / "own_detections.json"
    labels.write_text(json.dumps(truth))
    proc = run("eval", str(small_onnx), "--data", str(labels), "--images", str(images), "--class-agnostic",
               "--backend", "onnxruntime,openvino", "--precision", "fp32", "--fidelity", "--fidelity-score", "0",
               "--min-ap50", "0.9", "--json", str(tmp_path / "eval.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    ort, ov = result["results"]["onnxruntime"], result["results"]["openvino"]
    assert ort["AP50"] > 0.9 and abs(ort["AP50"] - ov["AP50"]) <= 0.001 and abs(ort["AP"] - ov["AP"]) <= 0.001
    assert result["fidelity"]["results"]["openvino"]["AP50"] > 0.99
