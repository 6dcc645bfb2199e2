"""`tod-deploy check --target tensorrt`: the operator table, every method's export, hand-built edge cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tod_deploy.errors import UserError
from tod_deploy.export.pipeline import ExportResult, export_model
from tod_deploy.ops.binary_conv_ref import VERSION, BinaryConvAttrs, pack_weights
from tod_deploy.trt.support import TABLE_FILE, check_model, load_table

RPN = {"rpn_nms_pre": 300, "rpn_max_per_img": 200}
# Small exports, no parity check (the method tests prove parity): only the graph's contents matter here.
EXPORTS = {
    "sr_tod": ("sr_tod", {"input_size": "256x256", "top_k": 100, "model": {"detector": "faster_rcnn", **RPN}}),
    "dfr_decompose": ("dfr_det", {"input_size": "256x256", "binary_conv": "decompose"}),
}


def quiet(_line: str) -> None:
    pass


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tod_deploy.cli", "check", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="session")
def exports(
    small_onnx: Path,
    small_cfinet: ExportResult,
    dfr_plugin_small: ExportResult,
    bh_small: ExportResult,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("trt_check")
    paths = {"thumbdet": small_onnx, "cfinet": small_cfinet.onnx_path, "dfr_plugin": dfr_plugin_small.onnx_path,
             "bh": bh_small.onnx_path}  # fmt: skip
    for key, (method, overrides) in EXPORTS.items():
        result = export_model(method, out, overrides=overrides, verify=False, name=key, log=quiet)
        paths[key] = result.onnx_path
    return paths


def save(tmp_path: Path, nodes: list, inputs: list, outputs: list, inits=(), opset: int = 19, extra=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra])
    model.ir_version = 10  # onnx 1.23 writes 14 by default; keep it readable by onnxruntime 1.31 as well
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def f32(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# -- the table itself --


def test_table_names_its_source_and_our_plugin() -> None:
    table = load_table()
    assert table["tensorrt"].startswith("11")
    assert "onnx-tensorrt" in table["source"]["operators"]["url"]
    assert table["source"]["operators"]["tensorrt_version_of_table"]
    ops = table["ops"]
    assert len(ops) > 150 and all({"supported", "types"} <= set(v) for v in ops.values())
    for op in ("Sign", "GridSample", "DeformConv", "RoiAlign", "NonMaxSuppression", "TopK", "Resize", "ScatterND",
               "QuantizeLinear", "DequantizeLinear"):  # fmt: skip
        assert ops[op]["supported"] and ops[op]["types"], op
    assert ops["TopK"]["rules"]["max_k"] == 3840
    assert not ops["ConvInteger"]["supported"]
    plugin = table["plugins"]["tod::BinaryConv2d"]
    assert (plugin["domain"], plugin["op_type"], plugin["available"]) == ("tod", "BinaryConv2d", True)
    assert plugin["versions"] == [1, 2] and plugin["versions"][-1] == VERSION  # the op's versions, newest last
    # Package data: pyproject ships it with the wheel.
    assert TABLE_FILE.name in (Path(__file__).parents[1] / "pyproject.toml").read_text()


# -- every method's export --


@pytest.mark.parametrize("key", ["thumbdet", "sr_tod", "dfr_plugin", "dfr_decompose", "bh", "cfinet"])
def test_exports_need_exactly_their_tod_nodes_as_plugins(exports: dict[str, Path], key: str) -> None:
    model = onnx.load(str(exports[key]), load_external_data=False)
    tod_nodes = [n.name for n in model.graph.node if n.domain == "tod"]
    report = check_model(exports[key])
    assert report.ok, [(r.node, r.reason) for r in report.problems]
    assert report.problems == [] and report.model_problems == []
    assert [(r.domain, r.op_type) for r in report.rows] == [(n.domain, n.op_type) for n in model.graph.node]
    assert [r.node for r in report.rows if r.status == "plugin"] == tod_nodes
    assert all(r.plugin == "tod::BinaryConv2d" for r in report.rows if r.status == "plugin")
    if key == "dfr_decompose":  # +-1 weights stored as int8 behind DequantizeLinear (zero point 0): TensorRT takes it
        assert "DequantizeLinear" in {r.op_type for r in report.rows}
    if key == "dfr_plugin":
        assert len(tod_nodes) == 16 + 8 * 5
        assert [(p.plugin, p.nodes, p.available) for p in report.plugins] == [("tod::BinaryConv2d", 56, True)]
    else:
        assert tod_nodes == [] and report.plugins == []
    # Small inputs keep every NMS under TensorRT's 5000-box limit: no warnings either.
    assert report.warnings == []
    ops = {r.op_type for r in report.rows}
    expected = {
        "thumbdet": {"GridSample", "TopK"},
        "sr_tod": {"Sign", "RoiAlign", "NonMaxSuppression", "TopK"},
        "cfinet": {"DeformConv", "RoiAlign", "NonMaxSuppression", "TopK"},
    }
    assert expected.get(key, {"NonMaxSuppression", "TopK"}) <= ops
    k_values = [int(r.detail.split("=")[1]) for r in report.rows if r.op_type == "TopK"]
    assert k_values and max(k_values) <= 3840


def test_cli_on_the_plugin_export(exports: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli(str(exports["dfr_plugin"]), "--target", "tensorrt", "--json", str(tmp_path / "c.json"))
    assert proc.returncode == 0, proc.stderr
    assert "tod::BinaryConv2d" in proc.stdout and "would build it" in proc.stdout
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["would_build"] and data["summary"]["plugin_nodes"] == 56
    assert data["source"]["operators"]["url"].startswith("https://github.com/onnx/onnx-tensorrt")
    rows = data["nodes"]
    assert len(rows) == data["summary"]["nodes"] and {"node", "op_type", "domain", "status", "reason"} <= set(rows[0])
    assert sum(r["status"] == "plugin" for r in rows) == 56


# -- hand-built models: what would not build, and why --


def test_unsupported_op_and_unknown_domain_exit_1(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
        helper.make_node("ConvInteger", ["q", "w"], ["b"], name="int_conv"),
        helper.make_node("FancyOp", ["a"], ["c"], name="mystery", domain="acme"),
        helper.make_node("BinaryConv2d", ["a"], ["d"], name="tod_other", domain="tod"),  # no such tod op: no plugin
    ]
    path = save(
        tmp_path, nodes,
        [f32("x", [1, 3, 8, 8]), helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 3, 8, 8])],
        [f32("c", [1, 3, 8, 8]), f32("d", [1, 3, 8, 8]), helper.make_tensor_value_info("b", TensorProto.INT32, None)],
        inits=[numpy_helper.from_array(np.ones((4, 3, 3, 3), np.uint8), "w")],
        extra=[helper.make_opsetid("acme", 1), helper.make_opsetid("tod", 1)],
    )  # fmt: skip
    report = check_model(path)
    assert not report.ok
    status = {r.node: r.status for r in report.rows}
    assert status["ok_relu"] == "supported" and status["int_conv"] == "unsupported"
    assert status["mystery"] == "missing-plugin"
    assert status["tod_other"] == "plugin"  # tod::BinaryConv2d is ours, whatever its inputs
    mystery = next(r for r in report.rows if r.node == "mystery")
    assert "acme" in mystery.reason and "plugin" in mystery.fix
    proc = run_cli(str(path), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 1, proc.stderr
    assert "would NOT build" in proc.stdout and "int_conv" in proc.stdout and "mystery" in proc.stdout
    rows = json.loads((tmp_path / "r.json").read_text())["nodes"]
    assert {r["node"]: r["status"] for r in rows} == status


def test_unknown_tod_op_needs_the_decompose_export(tmp_path: Path) -> None:
    node = helper.make_node("BinaryLinear", ["x"], ["y"], name="bl", domain="tod")
    path = save(tmp_path, [node], [f32("x", [1, 4])], [f32("y", [1, 4])], extra=[helper.make_opsetid("tod", 1)])
    (row,) = check_model(path).rows
    assert row.status == "missing-plugin" and "--binary-conv decompose" in row.fix


def test_tod_op_of_another_version(tmp_path: Path) -> None:
    node = helper.make_node("BinaryConv2d", ["x"], ["y"], name="bc", domain="tod")
    path = save(tmp_path, [node], [f32("x", [1, 4])], [f32("y", [1, 4])], extra=[helper.make_opsetid("tod", 3)])
    (row,) = check_model(path).rows
    assert row.status == "missing-plugin" and "version 3; our plugin builds versions 1, 2" in row.reason


def binary_conv_node_model(tmp_path: Path, version: int) -> Path:
    """One tod::BinaryConv2d as its op version writes it: v1 four inputs and nine attributes; v2 six inputs
    (the empty float32 initializer for an absent residual and slope) and ten."""
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=4, pads=(1, 1, 1, 1))
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(pack_weights(rng.standard_normal((6, 4, 3, 3)), attrs.zero_sign), "w"),
             numpy_helper.from_array(np.ones(6, np.float32), "alpha"),
             numpy_helper.from_array(np.zeros(6, np.float32), "bias")]  # fmt: skip
    fields, inputs = attrs.to_onnx(), ["x", "w", "alpha", "bias"]
    if version == 1:
        del fields["activation"]
    else:
        inits.append(numpy_helper.from_array(np.zeros((0,), np.float32), "none"))
        inputs += ["none", "none"]
    node = helper.make_node("BinaryConv2d", inputs, ["y"], name="bc", domain="tod", **fields)
    return save(tmp_path, [node], [f32("x", [1, 4, 8, 8])], [f32("y", [1, 6, 8, 8])], inits=inits,
                extra=[helper.make_opsetid("tod", version)])  # fmt: skip


@pytest.mark.parametrize("version", [1, 2])
def test_both_op_versions_would_build(tmp_path: Path, version: int) -> None:
    """Version 2 (six inputs, empty initializers for none) and version 1 (upgraded by build-engine) both build."""
    report = check_model(binary_conv_node_model(tmp_path, version))
    (row,) = report.rows
    assert report.ok and row.status == "plugin" and row.plugin == "tod::BinaryConv2d"
    assert row.detail == ("op version 1, built as version 2" if version == 1 else "")
    assert [(p.plugin, p.nodes, p.available) for p in report.plugins] == [("tod::BinaryConv2d", 1, True)]


def topk_model(tmp_path: Path, k: int, n: int = 27300) -> Path:
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=1)
    k_init = numpy_helper.from_array(np.array([k], np.int64), "k")
    outs = [f32("v", [1, k]), helper.make_tensor_value_info("i", TensorProto.INT64, [1, k])]
    return save(tmp_path, [node], [f32("x", [1, n])], outs, inits=[k_init])


def test_topk_limit(tmp_path: Path) -> None:
    assert check_model(topk_model(tmp_path, 3840)).ok  # ThumbDet's 300 queries x 91 classes, K up to 3840
    (row,) = check_model(topk_model(tmp_path, 5000)).rows
    assert row.status == "restricted" and "3840" in row.reason and "--top-k" in row.fix and row.detail == "K=5000"


def test_deform_conv_opset19(tmp_path: Path) -> None:
    def model(pads: list[int], name: str) -> Path:
        node = helper.make_node("DeformConv", ["x", "w", "off"], ["y"], name="dcn", kernel_shape=[3, 3], pads=pads)
        inits = [numpy_helper.from_array(np.zeros((8, 8, 3, 3), np.float32), "w")]
        ins = [f32("x", [1, 8, 16, 16]), f32("off", [1, 18, 16, 16])]
        (tmp_path / name).mkdir()
        return save(tmp_path / name, [node], ins, [f32("y", [1, 8, 16, 16])], inits=inits, opset=19)

    report = check_model(model([1, 1, 1, 1], "sym"))
    assert report.ok and report.rows[0].status == "supported" and report.opset == 19
    (row,) = check_model(model([1, 0, 1, 2], "asym")).rows
    assert row.status == "restricted" and "pads" in row.reason and "Pad" in row.fix


@pytest.mark.parametrize(
    ("op", "attrs", "ok"),
    [
        ("Resize", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, True),
        ("Resize", {"mode": "cubic"}, False),
        ("Resize", {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, False),
        ("Resize", {"mode": "linear", "antialias": 1}, False),
        ("GridSample", {"mode": "linear", "padding_mode": "zeros", "align_corners": 0}, True),
        ("RoiAlign", {"mode": "avg", "coordinate_transformation_mode": "half_pixel"}, True),
        ("RoiAlign", {"mode": "max", "coordinate_transformation_mode": "output_half_pixel"}, True),
        ("ScatterND", {"reduction": "add"}, False),
    ],
)  # fmt: skip
def test_mode_restrictions(tmp_path: Path, op: str, attrs: dict, ok: bool) -> None:
    x = f32("x", [1, 4, 8, 8])
    if op == "Resize":
        scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
        node = helper.make_node(op, ["x", "", "scales"], ["y"], name="n", **attrs)
        path = save(tmp_path, [node], [x], [f32("y", [1, 4, 16, 16])], inits=[scales], opset=19)
    elif op == "GridSample":
        node = helper.make_node(op, ["x", "grid"], ["y"], name="n", **attrs)
        path = save(tmp_path, [node], [x, f32("grid", [1, 5, 5, 2])], [f32("y", [1, 4, 5, 5])], opset=20)
    elif op == "RoiAlign":
        node = helper.make_node(op, ["x", "rois", "idx"], ["y"], name="n", output_height=7, output_width=7, **attrs)
        ins = [x, f32("rois", [3, 4]), helper.make_tensor_value_info("idx", TensorProto.INT64, [3])]
        path = save(tmp_path, [node], ins, [f32("y", [3, 4, 7, 7])], opset=16)
    else:
        node = helper.make_node(op, ["x", "ind", "upd"], ["y"], name="n", **attrs)
        ins = [x, helper.make_tensor_value_info("ind", TensorProto.INT64, [2, 1]), f32("upd", [2, 4, 8, 8])]
        path = save(tmp_path, [node], ins, [f32("y", [1, 4, 8, 8])], opset=18)
    (row,) = check_model(path).rows
    assert (row.status == "supported") == ok, (row.status, row.reason)
    if not ok:
        assert row.reason and row.fix


def test_sign_input_type(tmp_path: Path) -> None:
    node = helper.make_node("Sign", ["x"], ["y"], name="s")
    ok = save(tmp_path, [node], [f32("x", [1, 8])], [f32("y", [1, 8])])
    assert check_model(ok).ok
    double = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, [1, 8]) for n in ("x", "y")]
    (row,) = check_model(save(tmp_path, [node], double[:1], double[1:])).rows
    assert row.status == "restricted" and "float64" in row.reason and "cast" in row.fix


def qdq_model(tmp_path: Path, zero_point: np.ndarray, axis: int | None = None) -> Path:
    """x -> QuantizeLinear -> DequantizeLinear -> y, per-tensor or per-channel (axis)."""
    scale = np.full(zero_point.shape, 0.05, np.float32)
    kwargs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q", **kwargs),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq", **kwargs),
    ]
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "zp")]
    return save(tmp_path, nodes, [f32("x", [1, 4, 8, 8])], [f32("y", [1, 4, 8, 8])], inits=inits)


def test_int8_qdq(tmp_path: Path) -> None:
    assert check_model(qdq_model(tmp_path, np.array(0, np.int8))).ok  # per tensor
    assert check_model(qdq_model(tmp_path, np.zeros(4, np.int8), axis=1)).ok  # per channel
    report = check_model(qdq_model(tmp_path, np.array(128, np.uint8)))  # onnxruntime's asymmetric uint8 default
    assert not report.ok and {r.node for r in report.problems} == {"q", "dq"}
    assert all("ActivationSymmetric" in r.fix for r in report.problems)


def test_subgraphs_and_local_functions_are_checked(tmp_path: Path) -> None:
    then = helper.make_graph([helper.make_node("ConvInteger", ["a", "b"], ["t"], name="inner")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.INT32, None)])  # fmt: skip
    other = helper.make_graph([helper.make_node("Constant", [], ["e"], name="c", value_int=0)], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.INT64, None)])  # fmt: skip
    fn = helper.make_function("local", "Swishy", ["x"], ["y"],
                              [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])],
                              [helper.make_opsetid("", 19)])  # fmt: skip
    nodes = [
        helper.make_node("If", ["cond"], ["r"], name="branch", then_branch=then, else_branch=other),
        helper.make_node("Swishy", ["x"], ["z"], name="fn_call", domain="local"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), f32("x", [4]),
         helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 1, 3, 3]),
         helper.make_tensor_value_info("b", TensorProto.UINT8, [1, 1, 1, 1])],
        [helper.make_tensor_value_info("r", TensorProto.INT32, None), f32("z", [4])],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("local", 1)], functions=[fn]
    )
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "m.onnx"))
    report = check_model(tmp_path / "m.onnx")
    by_node = {r.node: r for r in report.rows}
    assert by_node["fn_call"].status == "supported" and "inlined" in by_node["fn_call"].reason
    assert by_node["inner"].status == "unsupported" and by_node["inner"].graph == "branch/then_branch"
    assert [r.node for r in report.problems] == ["inner"]


def test_opset_out_of_range(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="r")
    report = check_model(save(tmp_path, [node], [f32("x", [2])], [f32("y", [2])], opset=8))
    assert not report.ok and "--opset" in report.model_problems[0]["fix"]


# -- bad input: one line, exit 2 --


@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        (lambda p: p.write_bytes(b"\x08\x07garbage that is not protobuf\xff\xfe"), (), "not a readable ONNX model"),
        (lambda p: None, (), "does not exist"),
        (lambda p: p.write_bytes(b""), ("--target", "openvino"), "unknown target 'openvino'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, setup, args: tuple[str, ...], needle: str) -> None:
    path = tmp_path / "model.onnx"
    setup(path)
    proc = run_cli(str(path), *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def test_user_errors_from_python(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown target"):
        check_model(tmp_path / "x.onnx", target="tflite")


def test_help_reads_well() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for needle in ("--target", "--json", "plugin", "Exit status"):
        assert needle in proc.stdout
