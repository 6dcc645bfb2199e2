"""The tod::BinaryConv2d TensorRT plugin's plain-Python parts, against the op's NumPy reference.

The decorated TensorRT functions only call these, so what is checked here is what the engine
builder computes; the run on a GPU (last test) skips on machines without TensorRT and a GPU.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from tod_deploy.errors import UserError
from tod_deploy.ops.binary_conv_ref import BinaryConvAttrs, binary_conv2d_ref, pack_weights
from tod_deploy.trt import kernels
from tod_deploy.trt.plugins import (
    INPUT_NAMES,
    attrs_from_fields,
    check_slope,
    has_residual,
    kernel_args,
    launch,
    output_dtype,
    output_shape,
    pick_arch,
    register_plugins,
)

KERNELS = (1, 3)
STRIDES = (1, 2)
PADS = ((0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 1, 0), (2, 0, 1, 1))  # ONNX order top, left, bottom, right
DILATIONS = (1, 2)
GROUPS = (1, 2)
COMBOS = list(itertools.product(KERNELS, STRIDES, PADS, DILATIONS, GROUPS))
X_SHAPE = (2, 4, 9, 10)
COUT = 6


class Sym:
    """A stand-in for TensorRT's symbolic shape expressions: +, -, * only (no //, no comparisons)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __add__(self, other: Sym | int) -> Sym:
        return Sym(self.value + _v(other))

    __radd__ = __add__

    def __sub__(self, other: Sym | int) -> Sym:
        return Sym(self.value - _v(other))

    def __rsub__(self, other: int) -> Sym:
        return Sym(other - self.value)

    def __mul__(self, other: Sym | int) -> Sym:
        return Sym(self.value * _v(other))

    __rmul__ = __mul__


def _v(x: Sym | int) -> int:
    return x.value if isinstance(x, Sym) else x


def sym_cdiv(a: Any, b: Any) -> Any:
    """Like trtp.cdiv: symbolic in, symbolic out; two ints are computed directly."""
    if isinstance(a, int) and isinstance(b, int):
        return kernels.ceil_div(a, b)
    return Sym(kernels.ceil_div(_v(a), _v(b)))


def fields(k: int, s: int, pads: tuple[int, ...], d: int, g: int) -> dict[str, object]:
    """The node attributes as TensorRT hands them to the plugin (list attributes as strings)."""
    return {
        "kernel_shape": f"{k},{k}", "strides": f"{s},{s}", "pads": ",".join(map(str, pads)),
        "dilations": f"{d},{d}", "group": g, "in_channels": X_SHAPE[1], "threshold": 0.25, "zero_sign": -1,
        "pad_value": -1, "activation": "relu",
    }  # fmt: skip


def w_packed_shape(attrs: BinaryConvAttrs) -> tuple[int, ...]:
    return attrs.packed_shape(COUT)


@pytest.mark.parametrize(("k", "s", "pads", "d", "g"), COMBOS)
def test_output_shape_matches_the_reference(k: int, s: int, pads: tuple[int, ...], d: int, g: int) -> None:
    attrs = attrs_from_fields(fields(k, s, pads, d, g))
    n, c, h, w = X_SHAPE
    expected = (n, COUT, *attrs.output_size(h, w))
    assert output_shape(X_SHAPE, w_packed_shape(attrs), attrs, kernels.ceil_div) == expected
    # ... and on symbolic dims (the engine's dynamic batch, H and W), with the same values.
    symbolic = output_shape([Sym(n), c, Sym(h), Sym(w)], w_packed_shape(attrs), attrs, sym_cdiv)
    assert tuple(_v(x) for x in symbolic) == expected
    # The reference itself produces that shape.
    rng = np.random.default_rng(k * 100 + s * 10 + d + g)
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    weight = rng.standard_normal((COUT, c // g, k, k)).astype(np.float32)
    _, y = binary_conv2d_ref(x, weight, np.ones(COUT, np.float32), np.zeros(COUT, np.float32), attrs)
    assert y.shape == expected


@pytest.mark.parametrize(("k", "s", "pads", "d", "g"), COMBOS)
def test_kernel_args_and_launch(k: int, s: int, pads: tuple[int, ...], d: int, g: int) -> None:
    attrs = attrs_from_fields(fields(k, s, pads, d, g))
    args = kernel_args(X_SHAPE, COUT, attrs, kernels.ceil_div, has_residual=True)
    assert args == kernels.kernel_int_args(X_SHAPE, COUT, attrs, kernels.ceil_div, has_residual=True)
    named = dict(zip(kernels.KERNEL_INT_ARGS, args, strict=True))
    out_h, out_w = attrs.output_size(*X_SHAPE[2:])
    assert (named["n"], named["c"], named["h"], named["w"]) == X_SHAPE
    assert (named["out_channels"], named["out_h"], named["out_w"]) == (COUT, out_h, out_w)
    assert (named["pad_top"], named["pad_left"], named["group"]) == (pads[0], pads[1], g)
    assert named["threshold_bits"] == kernels.float_bits(0.25) and all(isinstance(a, int) for a in args)
    assert (named["activation"], named["has_residual"]) == (1, 1)  # relu (binary_conv2d_core.h: kActRelu)
    symbolic = kernel_args([Sym(2), 4, Sym(9), Sym(10)], COUT, attrs, sym_cdiv, has_residual=True)
    assert [_v(a) for a in symbolic] == args
    geometry = launch(X_SHAPE, COUT, attrs, kernels.ceil_div)
    assert geometry == kernels.launch_geometry(X_SHAPE, COUT, attrs, kernels.ceil_div)
    assert geometry.grid[2] == X_SHAPE[0] and geometry.grid[0] * kernels.BLOCK_M >= out_h * out_w


def test_output_dtype_is_the_references() -> None:
    attrs = attrs_from_fields(fields(3, 1, (1, 1, 1, 1), 1, 1))
    x = np.ones((1, 4, 5, 5), np.float32)
    _, y = binary_conv2d_ref(x, np.ones((COUT, 4, 3, 3), np.float32), np.ones(COUT, np.float32), None, attrs)
    f32, i32, f16 = np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.float16)
    assert INPUT_NAMES == ("x", "w_packed", "alpha", "bias", "residual", "slope")
    assert output_dtype([f32, i32, f32, f32, f32, f32], float32=f32, packed=i32) == y.dtype
    with pytest.raises(UserError, match="input x is float16"):
        output_dtype([f16, i32, f32, f32, f32, f32], float32=f32, packed=i32)
    with pytest.raises(UserError, match="input w_packed is uint8"):
        output_dtype([f32, np.dtype(np.uint8), f32, f32, f32, f32], float32=f32, packed=i32)
    with pytest.raises(UserError, match="input residual is float16"):  # the empty "none" tensor too
        output_dtype([f32, i32, f32, f32, f16, f32], float32=f32, packed=i32)
    with pytest.raises(UserError, match="input slope is int32"):
        output_dtype([f32, i32, f32, f32, f32, i32], float32=f32, packed=i32)
    with pytest.raises(UserError, match="has 4 inputs; the kernel reads x, w_packed, alpha, bias, residual, slope"):
        output_dtype([f32, i32, f32, f32], float32=f32, packed=i32)


def test_residual_and_slope_shapes() -> None:
    """has_residual comes from the residual's shape: Y-shaped (rank 4) or the empty [0] that means none."""
    y = [2, COUT, 5, 5]
    assert has_residual([0], y) is False and has_residual([None], [None] * 4) is False
    assert has_residual(y, y) is True and has_residual([None, COUT, 5, None], [2, None, 5, 5]) is True
    for bad in ([3], [2, COUT + 1, 5, 5], [2, COUT, 5, 4], [COUT, 5, 5]):
        with pytest.raises(UserError, match=r"input residual has shape .* must be Y's \[2, 6, 5, 5\] or the empty"):
            has_residual(bad, y)
    with pytest.raises(UserError, match=r"must be Y's \[\?, 6, 5, 5\]"):
        has_residual([2, COUT, 4, 5], [None, COUT, 5, 5])
    prelu = attrs_from_fields({**fields(3, 1, (1, 1, 1, 1), 1, 1), "activation": "prelu"})
    relu = attrs_from_fields(fields(3, 1, (1, 1, 1, 1), 1, 1))
    check_slope([COUT], COUT, prelu)
    check_slope([None], None, prelu)  # unknown in the dtype pass: checked again with shapes
    check_slope([0], COUT, relu)
    with pytest.raises(UserError, match=r"input slope has shape \[0\]; with activation 'prelu' it must be \[6\]"):
        check_slope([0], COUT, prelu)
    with pytest.raises(UserError, match=r"with activation 'relu' it must be \[0\]"):
        check_slope([COUT], COUT, relu)


def test_attributes_arrive_as_strings_or_bytes() -> None:
    as_bytes = {k: (v.encode() if isinstance(v, str) else v) for k, v in fields(3, 2, (0, 1, 1, 0), 2, 2).items()}
    attrs = attrs_from_fields(as_bytes)
    assert attrs.pads == (0, 1, 1, 0) and attrs.dilations == (2, 2) and attrs.group == 2
    with pytest.raises(UserError, match="lacks attributes"):
        attrs_from_fields({"kernel_shape": "3,3"})


def test_packed_weights_shape_is_what_the_plugin_reads() -> None:
    attrs = attrs_from_fields(fields(3, 1, (1, 1, 1, 1), 1, 2))
    packed = pack_weights(np.random.default_rng(0).standard_normal((COUT, 2, 3, 3)), attrs.zero_sign)
    assert packed.shape == w_packed_shape(attrs)
    assert packed.shape[-1] % 4 == 0  # so the int32 view TensorRT is given (tensorrt_view) is exact


@pytest.mark.parametrize(
    ("capability", "arch"),
    [
        ((7, 5), "sm_75"),
        ((8, 0), "sm_80"),
        ((8, 6), "sm_80"),
        ((8, 7), "sm_87"),
        ((8, 9), "sm_87"),
        ((9, 0), "sm_90"),
        ((12, 0), "sm_90"),
    ],
)
def test_ptx_target_for_a_device(capability: tuple[int, int], arch: str) -> None:
    assert pick_arch(capability) == arch


def test_too_old_a_gpu_is_one_clear_error() -> None:
    with pytest.raises(UserError, match=r"compute capability 7\.0\) is older"):
        pick_arch((7, 0))


def test_register_without_tensorrt_says_what_to_install() -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match="TensorRT is not installed.*pip install 'tod-deploy\\[gpu\\]'"):
        register_plugins()


def test_cuda_without_a_gpu_is_one_clear_error() -> None:
    from tod_deploy.trt.runtime import require_cuda

    try:
        require_cuda()
    except UserError as exc:
        assert "\n" not in exc.line() and ("CUDA" in exc.problem or "cuda" in exc.problem)
    else:
        pytest.skip("a CUDA device is present")


# (op version, activation, residual): a version-1 node (4 inputs, upgraded by tensorrt_view), and version 2.
GPU_NODES = [(1, "none", False), (2, "prelu", True), (2, "relu", False)]


@pytest.mark.parametrize(("version", "activation", "residual"), GPU_NODES, ids=["v1", "v2-prelu-residual", "v2-relu"])
def test_plugin_on_a_gpu_matches_the_reference(tmp_path: Any, version: int, activation: str, residual: bool) -> None:
    """One tod::BinaryConv2d node through TensorRT's ONNX parser, the AOT kernel and the runner."""
    pytest.importorskip("tensorrt")
    from tod_deploy.trt.runtime import require_cuda

    try:
        require_cuda()
    except UserError as exc:
        pytest.skip(f"no usable GPU: {exc.problem}")
    import dataclasses

    import onnx
    from onnx import helper, numpy_helper

    from tod_deploy.trt.builder import build_serialized, plan_build
    from tod_deploy.trt.runner import TensorRTRunner

    attrs = dataclasses.replace(attrs_from_fields(fields(3, 2, (0, 1, 1, 0), 2, 2)), activation=activation)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((COUT, 2, 3, 3)).astype(np.float32)
    alpha, bias = rng.random(COUT).astype(np.float32), rng.standard_normal(COUT).astype(np.float32)
    y_shape = (X_SHAPE[0], COUT, *attrs.output_size(*X_SHAPE[2:]))
    shortcut = rng.standard_normal(y_shape).astype(np.float32) if residual else None
    slope = rng.uniform(-1, 1, COUT).astype(np.float32) if activation == "prelu" else None
    none = np.zeros((0,), np.float32)
    inits = [numpy_helper.from_array(pack_weights(weight, attrs.zero_sign), "w"),
             numpy_helper.from_array(alpha, "alpha"), numpy_helper.from_array(bias, "bias")]  # fmt: skip
    node_attrs = attrs.to_onnx()
    inputs = ["images", "w", "alpha", "bias"]
    if version == 1:
        del node_attrs["activation"]
    else:
        inputs += ["residual", "slope"]
        inits += [numpy_helper.from_array(none if a is None else a, name)
                  for a, name in ((shortcut, "residual"), (slope, "slope"))]  # fmt: skip
    node = helper.make_node("BinaryConv2d", inputs, ["y"], domain="tod", **node_attrs)
    graph = helper.make_graph(
        [node], "one_binary_conv",
        [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, list(X_SHAPE))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tod", version)])
    model.ir_version = 10
    path = tmp_path / "one.onnx"
    onnx.save(model, str(path))
    runner = TensorRTRunner(build_serialized(plan_build(path), log=lambda _line: None))
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    _, expected = binary_conv2d_ref(x, weight, alpha, bias, attrs, residual=shortcut, slope=slope)
    np.testing.assert_allclose(runner.run(x)["y"], expected, rtol=1e-6, atol=1e-6)
