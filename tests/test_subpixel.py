"""Transposed convs as sub-pixel convs (the onnxruntime INT8 layout's rewrite) against PyTorch's own."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tod_deploy.export.passes import IR_VERSION
from tod_deploy.quant.subpixel import split_transposed_convs


def transposed_conv(kernel: int, stride: int, pad: int, bias: bool, seed: int) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(seed)
    arrays = {"w": rng.standard_normal((6, 5, kernel, kernel)).astype(np.float32)}
    if bias:
        arrays["b"] = rng.standard_normal(5).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", *arrays], ["y"], name="up", kernel_shape=[kernel, kernel],
                            strides=[stride, stride], pads=[pad] * 4, auto_pad="NOTSET")  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 9, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model, arrays


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(("kernel", "stride", "pad", "bias"), [(4, 2, 1, True), (2, 2, 0, False), (3, 3, 0, True),
                                                             (8, 4, 2, False)])  # fmt: skip
def test_sub_pixel_form_computes_the_transposed_conv(kernel: int, stride: int, pad: int, bias: bool) -> None:
    """Each exact upsampling (output = stride x input) becomes stride**2 Convs + Concat + DepthToSpace,
    equal to PyTorch's conv_transpose2d in float64 up to float32 rounding; the output keeps its name."""
    model, arrays = transposed_conv(kernel, stride, pad, bias, seed=kernel + stride)
    split, names = split_transposed_convs(model)
    assert names == ["up"]
    ops = [n.op_type for n in split.graph.node]
    assert ops.count("Conv") == stride**2 and ops[-1] == "DepthToSpace" and "ConvTranspose" not in ops
    assert split.graph.node[-1].output == ["y"] and {i.name for i in split.graph.initializer}.isdisjoint({"w"})
    x = np.random.default_rng(1).standard_normal((2, 6, 9, 7)).astype(np.float32)
    as_double = {k: torch.from_numpy(v).double() for k, v in arrays.items()}
    expected = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x).double(), as_double["w"], as_double.get("b"), stride=stride, padding=pad
    ).numpy()
    got = run(split, x)
    assert got.shape == expected.shape == (2, 5, 9 * stride, 7 * stride)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(("kernel", "stride", "pad"), [(6, 3, 1), (4, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_other_transposed_convs_are_left_alone(kernel: int, stride: int, pad: int) -> None:
    """Output not stride x input (or stride 1): no sub-pixel form, the node is kept as exported."""
    model, _ = transposed_conv(kernel, stride, pad, True, seed=0)
    split, names = split_transposed_convs(model)
    assert names == [] and [n.op_type for n in split.graph.node] == ["ConvTranspose"]
