"""build-engine without a GPU: profiles, the build plan of real exports, the ONNX TensorRT is given,
and the CLI (plan-only works anywhere; building, benchmarking and verifying engines say what to
install). Building and running engines needs TensorRT and a GPU: those tests skip here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_cli import assert_one_line_error, run

from tod_deploy.artifacts import sidecar_path
from tod_deploy.errors import UserError
from tod_deploy.export.pipeline import ExportResult, export_model
from tod_deploy.ops.binary_conv_ref import INPUTS, BinaryConvAttrs
from tod_deploy.ops.binary_conv_versions import NONE_INPUT
from tod_deploy.trt.builder import (
    DEFAULT_WORKSPACE_GIB,
    GIB,
    layer_summary,
    onnx_precision,
    plan_build,
    plugins_needed,
)
from tod_deploy.trt.plugins import AOT_ATTR, NAMESPACE_ATTR, tensorrt_view
from tod_deploy.trt.profiles import DEFAULT_MAX_BATCH, InputSpec, parse_shape, resolve_profiles

IMAGES = InputSpec("images", "float32", ("batch", 3, 256, 384))


def has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def dfr_plugin_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """A small 1-bit DFR-Det with tod::BinaryConv2d nodes and a dynamic batch (no parity run: not tested here)."""
    overrides = {"input_size": "256x256", "binary_conv": "plugin", "batch": "dynamic"}
    out = tmp_path_factory.mktemp("dfr")
    return export_model("dfr_det", out, overrides=overrides, verify=False, log=lambda _line: None)


def test_parse_shape() -> None:
    assert parse_shape("1x3x512x512", "--min") == (1, 3, 512, 512)
    assert parse_shape(" 2X3x8x8 ", "--max") == (2, 3, 8, 8)
    for bad, needle in (("1x3xax4", "cannot read --min"), ("", "cannot read --min"), ("1x0x4", "<= 0")):
        with pytest.raises(UserError, match=needle):
            parse_shape(bad, "--min")


def test_profile_defaults_and_partial_flags() -> None:
    (p,) = resolve_profiles([IMAGES], input_size=(256, 384))
    assert (p.min, p.opt, p.max) == ((1, 3, 256, 384), (1, 3, 256, 384), (DEFAULT_MAX_BATCH, 3, 256, 384))
    (p,) = resolve_profiles([IMAGES], opt_text="4x3x256x384")
    assert (p.min[0], p.opt[0], p.max[0]) == (1, 4, DEFAULT_MAX_BATCH)
    (p,) = resolve_profiles([IMAGES], min_text="images:2x3x256x384", max_text="16x3x256x384")
    assert (p.min[0], p.opt[0], p.max[0]) == (2, 2, 16)
    static = InputSpec("images", "float32", (1, 3, 256, 384))
    (p,) = resolve_profiles([static])
    assert p.min == p.opt == p.max == (1, 3, 256, 384)


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        ({"min_text": "4x3x256x384", "opt_text": "2x3x256x384"}, ["'images'", "min 4, opt 2", "dim 0"]),
        ({"max_text": "8x3x256"}, ["--max for input 'images' has 3 dims", "has 4"]),
        ({"max_text": "8x3x512x384"}, ["'images' sets dim 2 to 512", "fixes it at 256"]),
        ({"min_text": "0x3x256x384"}, ["--min shape '0x3x256x384' has a dimension <= 0"]),
        ({"min_text": "1x3xfoo"}, ["cannot read --min shape"]),
        ({"opt_text": "other:1x3x256x384"}, ["--opt names input 'other'", "inputs: images"]),
    ],
)
def test_bad_profiles_name_the_input(flags: dict[str, str], needles: list[str]) -> None:
    with pytest.raises(UserError) as info:
        resolve_profiles([IMAGES], **flags)
    for needle in needles:
        assert needle in info.value.line()


def test_profiles_without_defaults() -> None:
    spatial = InputSpec("images", "float32", ("batch", 3, "height", "width"))
    with pytest.raises(UserError, match="'images' has dynamic dims .* no default"):
        resolve_profiles([spatial])
    (p,) = resolve_profiles([spatial], input_size=(256, 320))  # the export's recipe fills H and W
    assert p.max == (DEFAULT_MAX_BATCH, 3, 256, 320)
    two = [IMAGES, InputSpec("scale", "float32", (1, 2))]
    with pytest.raises(UserError, match="does not say which input"):
        resolve_profiles(two, min_text="1x3x256x384")


def test_plan_of_a_thumbdet_export(small_onnx: Path) -> None:
    plan = plan_build(small_onnx)
    assert plan.inputs == [{"name": "images", "dtype": "float32", "shape": [1, 3, 256, 384]}]
    (p,) = plan.profiles
    assert (p.input, p.min, p.opt, p.max) == ("images", (1, 3, 256, 384), (1, 3, 256, 384), (1, 3, 256, 384))
    assert plan.precision == "FP32" and plan.plugins == [] and plan.strongly_typed
    assert plan.output == str(small_onnx.with_suffix(".engine"))
    assert plan.workspace_bytes == int(DEFAULT_WORKSPACE_GIB * GIB) and plan.timing_cache is None
    assert plan.export["method"] == "thumbdet" and plan.export["recipe"]["input_size"] == [256, 384]
    saved = json.loads(json.dumps(plan.to_dict()))
    assert saved["sidecar"] == str(sidecar_path(Path(plan.output))) and saved["notes"] == []
    assert saved["sidecar"].endswith("thumbdet.engine.json")  # never the export's thumbdet.json


def test_plan_of_a_dfr_det_plugin_export(dfr_plugin_export: ExportResult, tmp_path: Path) -> None:
    plan = plan_build(dfr_plugin_export.onnx_path, tmp_path / "x.engine", max_shape="4x3x256x256", workspace_gib=1.5)
    assert plan.plugins == ["tod::BinaryConv2d"] and plan.precision == "FP32"
    (p,) = plan.profiles
    assert (p.min, p.opt, p.max) == ((1, 3, 256, 256), (1, 3, 256, 256), (4, 3, 256, 256))
    assert plan.inputs[0]["shape"] == ["batch", 3, 256, 256] and plan.workspace_bytes == int(1.5 * GIB)
    assert "tod::BinaryConv2d" in plan.describe()


def test_tensorrt_view_of_binary_conv_nodes(dfr_plugin_export: ExportResult) -> None:
    model = onnx.load(str(dfr_plugin_export.onnx_path))
    original = model.SerializeToString()
    view = tensorrt_view(model)
    assert model.SerializeToString() == original  # the export itself is untouched
    tod_nodes = [n for n in view.graph.node if n.domain == "tod"]
    assert len(tod_nodes) == 16 + 8 * 5
    canonical = [*BinaryConvAttrs(kernel_shape=(1, 1), in_channels=1).to_onnx(), NAMESPACE_ATTR, AOT_ATTR]
    for node in tod_nodes:
        assert helper.get_attribute_value(next(a for a in node.attribute if a.name == NAMESPACE_ATTR)) == b"tod"
        assert [a.name for a in node.attribute] == canonical and len(node.input) == len(INPUTS)  # op version 2
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in view.graph.initializer}
    for node in tod_nodes:
        packed, words = before[node.input[1]], after[node.input[1]]
        assert packed.dtype == np.uint8 and words.dtype == np.int32
        assert words.shape == (*packed.shape[:-1], packed.shape[-1] // 4) and words.tobytes() == packed.tobytes()
    assert after[tod_nodes[0].input[2]].dtype == np.float32  # alpha and bias stay float


def test_tensorrt_view_reads_a_version_1_node_as_version_2() -> None:
    """A file written before the epilogue (four inputs, nine attributes, opset tod 1) gets the empty residual and
    slope and activation "none" in the view TensorRT parses; the file itself is untouched."""
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=4, pads=(1, 1, 1, 1))
    fields = {k: v for k, v in attrs.to_onnx().items() if k != "activation"}
    node = helper.make_node("BinaryConv2d", ["x", "w", "alpha", "bias"], ["y"], domain="tod", **fields)
    inits = [numpy_helper.from_array(np.zeros((6, 3, 3, 8), np.uint8), "w"),
             *(numpy_helper.from_array(np.ones(6, np.float32), name) for name in ("alpha", "bias"))]  # fmt: skip
    model = _tiny([node])
    model.graph.initializer.extend(inits)
    model.opset_import.append(helper.make_opsetid("tod", 1))
    original = model.SerializeToString()
    view = tensorrt_view(model)
    assert model.SerializeToString() == original
    (upgraded,) = [n for n in view.graph.node if n.domain == "tod"]
    assert list(upgraded.input) == ["x", "w", "alpha", "bias", NONE_INPUT, NONE_INPUT]
    assert {a.name: helper.get_attribute_value(a) for a in upgraded.attribute}["activation"] == b"none"
    assert [a.name for a in upgraded.attribute] == [*attrs.to_onnx(), NAMESPACE_ATTR, AOT_ATTR]
    assert [o.version for o in view.opset_import if o.domain == "tod"] == [2]
    none = next(numpy_helper.to_array(i) for i in view.graph.initializer if i.name == NONE_INPUT)
    assert none.shape == (0,) and none.dtype == np.float32


def _tiny(nodes: list[onnx.NodeProto], elem: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    x, y = helper.make_tensor_value_info("x", elem, [1, 4]), helper.make_tensor_value_info("y", elem, None)
    return helper.make_model(helper.make_graph(nodes, "tiny", [x], [y]))


def test_precision_comes_from_the_onnx() -> None:
    assert onnx_precision(_tiny([helper.make_node("Relu", ["x"], ["y"])])) == "FP32"
    assert onnx_precision(_tiny([helper.make_node("Relu", ["x"], ["y"])], onnx.TensorProto.FLOAT16)) == "FP16"
    cast = [helper.make_node("Cast", ["x"], ["h"], to=onnx.TensorProto.FLOAT16), helper.make_node("Relu", ["h"], ["y"])]
    assert onnx_precision(_tiny(cast)) == "FP16"
    qdq = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"])]
    qdq.append(helper.make_node("DequantizeLinear", ["q", "s"], ["y"]))
    assert onnx_precision(_tiny(qdq)) == "INT8"
    weight_only = [helper.make_node("DequantizeLinear", ["w", "s"], ["y"])]  # decomposed 1-bit convs: still FP32
    assert onnx_precision(_tiny(weight_only)) == "FP32"


def test_unknown_custom_op_has_no_plugin() -> None:
    with pytest.raises(UserError, match="tod::Mystery nodes, for which tod-deploy has no TensorRT plugin"):
        plugins_needed(_tiny([helper.make_node("Mystery", ["x"], ["y"], domain="tod")]))


def test_layer_summary_reads_tensorrt_11_inspector_json() -> None:
    info = {
        "Layers": [
            {"Name": "conv1", "LayerType": "CaskConvolution", "Outputs": [{"Name": "a", "DataType": "Float"}]},
            {"Name": "bc1", "LayerType": "PluginV3", "Outputs": [{"Name": "b", "DataType": "Float"}]},
            {"Name": "head", "LayerType": "CaskConvolution", "Outputs": [{"Name": "c", "DataType": "Half"}]},
            "names_only_layer",
        ],
        "I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "Float", "Dimensions": [1, 3, 8, 8]}],
    }
    summary = layer_summary(json.dumps(info))
    assert summary["layers"] == 4
    assert summary["by_type"] == {"CaskConvolution": 2, "PluginV3": 1, "?": 1}
    assert summary["by_precision"] == {"Float": 2, "Half": 1, "?": 1}
    assert summary["io_tensors"][0]["Name"] == "images"


def test_cli_plan_only_works_anywhere(small_export: ExportResult, tmp_path: Path) -> None:
    onnx_path = _copy_export(small_export, tmp_path)
    proc = run("build-engine", str(onnx_path), "--plan-only", "--workspace", "2", "--json", str(tmp_path / "plan.json"))
    assert proc.returncode == 0, proc.stderr
    assert "build plan" in proc.stdout and "images: min 1x3x256x384" in proc.stdout and "FP32" in proc.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["workspace_bytes"] == 2 * GIB and plan["plugins"] == [] and plan["precision"] == "FP32"
    assert not list(tmp_path.glob("*.engine*"))


def test_cli_bad_profile_is_one_line(small_onnx: Path) -> None:
    proc = run("build-engine", str(small_onnx), "--plan-only", "--max", "2x3x256x384")
    assert_one_line_error(proc, "input 'images' sets dim 0 to 2", "fixes it at 1")


@pytest.mark.skipif(has_tensorrt(), reason="TensorRT is installed here")
def test_cli_without_tensorrt_is_one_line_and_writes_nothing(small_export: ExportResult, tmp_path: Path) -> None:
    onnx_path = _copy_export(small_export, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(run("build-engine", str(onnx_path)), "TensorRT is not installed", "pip install")
    assert_one_line_error(run("bench", "--backend", "tensorrt", str(onnx_path)), "TensorRT is not installed")
    engine = tmp_path / "thumbdet.engine"
    engine.write_bytes(b"not really an engine")
    assert_one_line_error(run("bench", str(engine)), "TensorRT is not installed")
    assert_one_line_error(run("verify", str(engine), "--reference", str(onnx_path)), "TensorRT is not installed")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, engine.name])


def test_build_run_and_verify_an_engine(small_export: ExportResult, tmp_path: Path) -> None:
    """The whole GPU path: build-engine, bench on the engine, verify against the ONNX."""
    pytest.importorskip("tensorrt")
    from tod_deploy.trt.runtime import require_cuda

    try:
        require_cuda()
    except UserError as exc:
        pytest.skip(f"no usable GPU: {exc.problem}")
    onnx_path = _copy_export(small_export, tmp_path)
    cache = tmp_path / "timing.cache"
    proc = run("build-engine", str(onnx_path), "--timing-cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    engine = onnx_path.with_suffix(".engine")
    sidecar = json.loads(sidecar_path(engine).read_text())
    assert sidecar["layers"]["layers"] > 0 and sidecar["plan"]["precision"] == "FP32" and cache.is_file()
    proc = run("verify", str(engine), "--atol", "1e-3", "--json", str(tmp_path / "v.json"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is True
    proc = run("bench", str(engine), "--backend", "onnxruntime", "--iters", "3", "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert list(results) == ["tensorrt", "onnxruntime"] and results["tensorrt"]["compute_ms"] > 0


def _copy_export(result: ExportResult, into: Path) -> Path:
    """The session export's two files in a directory of the test's own, to see what else appears there."""
    for path in (result.onnx_path, result.sidecar_path):
        shutil.copy(path, into / path.name)
    return into / result.onnx_path.name
