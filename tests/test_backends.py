"""The backend registry: one Runner protocol, one module per runtime, one onnxruntime session factory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends import BACKENDS, ExportSource, RunnerOptions, open_runner, parse_backends
from tod_deploy.backends.onnxruntime_runner import interleaved_calls, new_session
from tod_deploy.errors import UserError
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS


def test_backend_names_are_parsed_once_each_in_order() -> None:
    assert BACKENDS == ("torch", "onnxruntime", "tensorrt", "openvino")
    assert parse_backends(None, "onnxruntime") == ["onnxruntime"]
    assert parse_backends("TensorRT, torch,torch", "onnxruntime") == ["tensorrt", "torch"]
    assert parse_backends("onnxruntime,OpenVINO", "torch") == ["onnxruntime", "openvino"]
    with pytest.raises(UserError, match="unknown backend"):
        parse_backends("openvion", "torch")
    with pytest.raises(UserError, match="unknown backend"):
        open_runner("tvm", ExportSource(Path("x.onnx"), {}))


def test_torch_and_onnxruntime_runners_agree_through_the_registry(small_onnx: Path) -> None:
    source = ExportSource(small_onnx, Sidecar.load(small_onnx))
    runners = {name: open_runner(name, source, RunnerOptions(threads=2, log=lambda _l: None)) for name in BACKENDS[:2]}
    images = np.random.default_rng(0).uniform(0, 255, (1, 3, 256, 384)).astype(np.float32)
    out = {name: runner.run(images) for name, runner in runners.items()}
    for name, runner in runners.items():
        assert runner.backend == name and set(CONTRACT_OUTPUTS) <= set(out[name])
    assert int(out["torch"]["num_dets"][0]) == int(out["onnxruntime"]["num_dets"][0]) > 0
    np.testing.assert_allclose(out["torch"]["scores"], out["onnxruntime"]["scores"], atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_without_tensorrt_is_one_line(small_onnx: Path) -> None:
    with pytest.raises(UserError, match="TensorRT"):
        open_runner("tensorrt", ExportSource(small_onnx, Sidecar.load(small_onnx)))


def test_the_session_factory_refuses_a_broken_graph_in_one_line() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    node = onnx.helper.make_node("Relu", ["missing"], ["y"])
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]))
    with pytest.raises(UserError, match="onnxruntime cannot load the model"):
        new_session(model)


def test_interleaved_sessions_run_their_models_and_do_not_spin() -> None:
    """Timed in turn on the same cores, a session's idle threads must not busy-wait through the next one's run."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    nodes = {op: onnx.helper.make_node(op, ["x"], ["y"]) for op in ("Neg", "Relu")}
    models = {op: onnx.helper.make_model(onnx.helper.make_graph([node], op, [x], [y])) for op, node in nodes.items()}
    images = np.array([-1.5, 2.0], dtype=np.float32)
    calls = interleaved_calls(models, images, 2)
    np.testing.assert_array_equal(calls["Neg"]()["y"], [1.5, -2.0])
    np.testing.assert_array_equal(calls["Relu"]()["y"], [0.0, 2.0])
    for call in calls.values():
        options = call.func.__self__.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.intra_op_num_threads == 2
