"""Models with tod::BinaryConv2d nodes as tod-deploy runs them (``ops.ort_segments``) against the same file in
one onnxruntime session with onnxruntime-extensions' hook (``ops.ort_binary_conv``), a user's own way.

With onnxruntime's graph optimizations off both compute exactly what the file defines, so they must agree bit
for bit; with them on, each session optimizes its own part of the graph, which moves results by float
rounding only.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tod_deploy.backends.onnxruntime_runner import new_session
from tod_deploy.errors import UserError
from tod_deploy.ops import ort_binary_conv
from tod_deploy.ops.binary_conv_ref import BinaryConvAttrs, binary_conv2d_ref, is_binary_conv, pack_weights
from tod_deploy.ops.ort_segments import SegmentedSession


def _images(model: onnx.ModelProto, seed: int) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).uniform(0, 255, dims).astype(np.float32)


def _extension_session(path: Path, optimize: bool) -> ort.InferenceSession:
    options = ort_binary_conv.session_options()
    options.intra_op_num_threads = 2
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort_binary_conv.BinaryConvSession(str(path), options, providers=["CPUExecutionProvider"])


def test_dfr_det_export_runs_as_the_extension_session_computes_it(dfr_plugin_small: object) -> None:
    path = dfr_plugin_small.onnx_path  # type: ignore[attr-defined]
    model = onnx.load(str(path))
    images = _images(model, 0)
    feed = {model.graph.input[0].name: images}
    segmented = new_session(model, threads=2, optimize=False)
    assert isinstance(segmented, SegmentedSession)
    segments = sum(1 for step in segmented._steps if not hasattr(step, "attrs"))
    binaries = sum(1 for node in model.graph.node if is_binary_conv(node))
    assert binaries >= 40 and segments < binaries / 4  # float parts grouped by waves, not one per tod node
    want = _extension_session(path, optimize=False).run(None, feed)
    got = segmented.run(None, feed)
    assert [o.name for o in segmented.get_outputs()] == [o.name for o in model.graph.output]
    for name, a, b in zip([o.name for o in model.graph.output], got, want, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), name

    optimized = new_session(model, threads=2).run(None, feed)
    reference = _extension_session(path, optimize=True).run(None, feed)
    scores = [i for i, o in enumerate(model.graph.output) if o.name == "scores"][0]
    np.testing.assert_allclose(optimized[scores], reference[scores], atol=1e-4)


def test_runs_from_many_threads_and_keeps_no_result_of_another_run(dfr_plugin_small: object) -> None:
    """Node outputs are reused per thread: concurrent runs and kept results must not see each other's."""
    model = onnx.load(str(dfr_plugin_small.onnx_path))  # type: ignore[attr-defined]
    session = new_session(model, threads=2, optimize=False)
    name = model.graph.input[0].name
    feeds = [{name: _images(model, seed)} for seed in range(4)]
    alone = [session.run(None, feed) for feed in feeds]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda feed: session.run(None, feed), feeds))
    for a, b in zip(alone, together, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(alone[0][1], alone[1][1])


def _chain_model(
    attrs: BinaryConvAttrs, channels: int, outputs: tuple[str, ...] = ("Z", "Y", "R")
) -> tuple[onnx.ModelProto, np.ndarray]:
    """X -> Relu -> R -> BinaryConv2d -> Y -> Neg -> S -> BinaryConv2d -> Z; ``outputs`` untyped."""
    weight = np.random.default_rng(3).standard_normal((channels, channels, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(pack_weights(weight, attrs.zero_sign), "W_packed"),
        numpy_helper.from_array(np.ones(channels, np.float32), "alpha"),
        numpy_helper.from_array(np.zeros(channels, np.float32), "bias"),
        numpy_helper.from_array(np.zeros(0, np.float32), "none"),
    ]
    conv_inputs = ["W_packed", "alpha", "bias", "none", "none"]
    nodes = [
        helper.make_node("Relu", ["X"], ["R"]),
        helper.make_node("BinaryConv2d", ["R", *conv_inputs], ["Y"], domain="tod", **attrs.to_onnx()),
        helper.make_node("Neg", ["Y"], ["S"]),
        helper.make_node("BinaryConv2d", ["S", *conv_inputs], ["Z"], domain="tod", **attrs.to_onnx()),
    ]
    shape = ["n", "c", "h", "w"]  # the kernel, not onnxruntime's Relu, checks the channels
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
        [helper.make_empty_tensor_value_info(n) for n in outputs],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("tod", 2)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model, weight


def test_tod_outputs_float_outputs_and_bad_input() -> None:
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=8, pads=(1, 1, 1, 1))
    model, weight = _chain_model(attrs, 8)
    session = new_session(model, threads=2)
    x = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32)
    z, y, r = session.run(None, {"X": x})
    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)
    np.testing.assert_array_equal(r, np.maximum(x, 0))
    np.testing.assert_array_equal(y, binary_conv2d_ref(r, weight, ones, zeros, attrs)[1])
    np.testing.assert_array_equal(z, binary_conv2d_ref(-y, weight, ones, zeros, attrs)[1])
    assert session.run(["Y"], {"X": x})[0].shape == (1, 8, 6, 6)
    with pytest.raises(UserError, match="missing model inputs"):
        session.run(None, {})
    with pytest.raises(UserError, match="not \\[N, 8, H, W\\]"):
        session.run(["Y"], {"X": np.ones((1, 7, 6, 6), np.float32)})


def test_profiling_gives_one_trace_with_the_kernel_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the trace lands in the current folder, as onnxruntime's does
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=8, pads=(1, 1, 1, 1))
    options = ort.SessionOptions()
    options.enable_profiling = True
    session = SegmentedSession(_chain_model(attrs, 8)[0], options)
    session.run(None, {"X": np.ones((1, 8, 6, 6), np.float32)})
    trace = Path(session.end_profiling())
    ops = [e["args"]["op_name"] for e in json.loads(trace.read_text()) if e.get("cat") == "Node"]
    assert trace.parent == tmp_path and list(tmp_path.iterdir()) == [trace]  # segment traces merged, removed
    assert ops.count("BinaryConv2d") == 2 and {"Relu", "Neg"} <= set(ops)
    with pytest.raises(UserError, match="enable_profiling"):
        new_session(_chain_model(attrs, 8)[0]).end_profiling()


def test_types_flow_through_tod_nodes_where_the_schema_is_not_registered() -> None:
    """A process that never imported the exporter has no tod schema for ONNX shape inference."""
    from tod_deploy.ops.binary_conv_onnx import register_onnx_schema

    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=8, pads=(1, 1, 1, 1))
    model, _ = _chain_model(attrs, 8, outputs=("Z",))  # nothing declares the type of Y or S
    register_onnx_schema()
    for version in (2, 1):
        onnx.defs.deregister_schema("BinaryConv2d", version, "tod")
    try:
        session = new_session(model, threads=1)
        (z,) = session.run(None, {"X": np.ones((1, 8, 6, 6), np.float32)})
    finally:
        register_onnx_schema()
    assert z.shape == (1, 8, 6, 6) and z.dtype == np.float32
