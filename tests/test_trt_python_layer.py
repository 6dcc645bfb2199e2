"""The tod::BinaryConv2d plugin driven through TensorRT 11.4's real Python plugin layer.

NVIDIA's ``tensorrt.plugin`` code from the ``tensorrt-cu13-bindings`` wheel (unchanged) runs over a
stand-in for its compiled core (``tensorrt_standin.py``); the plugin fields are built from real
DFR-Det exports as onnx-tensorrt's importer builds them, and the builder's calls are TensorRT's
(``tensorrt_importer.py``). What comes out (output types and shapes, launch grid, the kernel's extra
arguments, the PTX) is compared with kernels.py and the NumPy reference on the nodes' real inputs
(the exports' nodes are op version 2 with a fused residual and prelu; a hand-built version-1 node goes
through ``tensorrt_view``'s upgrade). Without a GPU the device is a stand-in too: compute capability
8.0 (PTX built here by nvcc).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import pytest
import tensorrt_importer as importer
import tensorrt_standin as standin
from onnx import helper

from tod_deploy.backends.onnxruntime_runner import new_session
from tod_deploy.errors import UserError
from tod_deploy.export.pipeline import export_model
from tod_deploy.ops.binary_conv_ref import (
    ACTIVATIONS,
    DOMAIN,
    OP_TYPE,
    BinaryConvAttrs,
    binary_conv2d_ref,
    pack_weights,
    unpack_weights,
)
from tod_deploy.ops.binary_conv_versions import NONE_INPUT
from tod_deploy.trt import kernels, plugins

pytestmark = standin.IGNORE_WHEEL_WARNINGS

SIZE = "128x128"  # FPN P2..P6: the coarsest level is still 2x2
# The binary nodes are the backbone's (every detector) and the head towers' (FCOS, RetinaNet); Faster R-CNN's
# heads are real-valued, so its export holds only the backbone's nodes again. RetinaNet at a dynamic batch.
EXPORTS = [("fcos", "1"), ("fcos", "dynamic"), ("retinanet", "dynamic")]
BATCHES = {"1": (1,), "dynamic": (1, 3)}
DEVICE_CAPABILITY = (8, 0)


class DeviceStandIn:
    """The GPU the engine would be built on: only its compute capability is asked for."""

    name = "stand-in"

    def compute_capability(self) -> tuple[int, int]:
        return DEVICE_CAPABILITY


@pytest.fixture(scope="module")
def trt() -> Iterator[Any]:
    """TensorRT's Python layer with our plugin registered through it (a fresh registry per module)."""
    # torch._dynamo (the exports import it) asks importlib for tensorrt's spec as it is first imported,
    # which the stand-in package (built without a spec) cannot answer: import it before the stand-in.
    import torch._dynamo  # noqa: F401

    plugins._register.cache_clear()
    with standin.python_layer(standin.python_layer_dir_or_skip()) as module, pytest.MonkeyPatch.context() as patch:
        patch.setattr(plugins, "require_cuda", DeviceStandIn)
        plugins.register_plugins()
        yield module
    plugins._register.cache_clear()


@pytest.fixture(scope="module", params=EXPORTS, ids=["-".join(e) for e in EXPORTS])
def export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, onnx.ModelProto]:
    detector, batch = request.param
    overrides = {"input_size": SIZE, "binary_conv": "plugin", "batch": batch, "model": {"detector": detector}}
    out = tmp_path_factory.mktemp(f"dfr_{detector}_{batch}")
    result = export_model("dfr_det", out, overrides=overrides, verify=False, log=lambda _line: None)
    return batch, onnx.load(str(result.onnx_path))


def binary_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def node_io(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    """Every tod node's X, residual (where computed in the graph) and Y on seeded images, from onnxruntime
    running the export itself."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    stored = {init.name for init in model.graph.initializer}
    names = {name for node in binary_nodes(model) for name in (node.input[0], node.input[4], node.output[0])} - stored
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in sorted(names - outputs))
    h, w = (int(v) for v in SIZE.split("x"))
    images = np.random.default_rng(batch).uniform(0, 255, (batch, 3, h, w)).astype(np.float32)
    session = new_session(probe)
    values = session.run(None, {session.get_inputs()[0].name: images})
    return dict(zip([o.name for o in session.get_outputs()], values, strict=True))


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    found = next(i for i in model.graph.initializer if i.name == name)
    return onnx.numpy_helper.to_array(found)


def stored(model: onnx.ModelProto, name: str) -> bool:
    return any(i.name == name for i in model.graph.initializer)


V2_TYPES = ("float32", "int32", "float32", "float32", "float32", "float32")  # x, w_packed (int32 view), ...


def input_types(trt: Any) -> list[Any]:
    return [getattr(trt, name) for name in V2_TYPES]


def test_registration_through_tensorrt_plugin_layer(trt: Any) -> None:
    import tensorrt.plugin as trtp

    definition = trtp.op.tod.BinaryConv2d
    assert definition.plugin_id == plugins.PLUGIN_ID
    assert definition.input_tensor_names == list(plugins.INPUT_NAMES) == [
        "x", "w_packed", "alpha", "bias", "residual", "slope"]  # fmt: skip
    assert list(definition.input_attrs) == [*("kernel_shape", "strides", "pads", "dilations"), "group", "in_channels",
                                            "threshold", "zero_sign", "pad_value", "activation"]  # fmt: skip
    assert list(definition.input_attrs) == list(BinaryConvAttrs(kernel_shape=(1, 1), in_channels=1).to_onnx())
    assert definition.aot_impl_func is not None and definition.impl_func is None
    creator = trt.get_plugin_registry().get_creator("BinaryConv2d", "1", "tod")
    assert isinstance(creator, trt.IPluginCreatorV3Quick)
    assert [f.name for f in creator.field_names] == list(definition.input_attrs)


def test_every_binary_node_of_real_exports(trt: Any, export: tuple[str, onnx.ModelProto]) -> None:
    batch_mode, model = export
    view = plugins.tensorrt_view(model)  # what build-engine hands TensorRT's ONNX parser
    nodes = binary_nodes(view)
    assert len(nodes) >= 16
    runs = {n: node_io(model, n) for n in BATCHES[batch_mode]}
    ptx = plugins.ptx_for("sm_80")
    for node in nodes:
        plugin = importer.create_plugin(trt, node)
        assert plugin is not None, f"no creator for {node.name}"
        assert isinstance(plugin, trt.IPluginV3QuickAOTBuild), "the parser must get the AOT implementation"
        x_static = list(runs[BATCHES[batch_mode][0]][node.input[0]].shape)
        x_dims = tuple(["batch", *x_static[1:]] if batch_mode == "dynamic" else x_static)
        w_view = initializer(view, node.input[1])
        assert w_view.dtype == np.int32 and len(node.input) == len(plugins.INPUT_NAMES)
        y_static = list(runs[BATCHES[batch_mode][0]][node.output[0]].shape)
        y_dims = tuple(["batch", *y_static[1:]] if batch_mode == "dynamic" else y_static)
        shapes = [x_dims, w_view.shape, *(initializer(view, name).shape for name in node.input[2:4]),
                  initializer(view, node.input[4]).shape if stored(view, node.input[4]) else y_dims,
                  initializer(view, node.input[5]).shape]  # fmt: skip
        layer = importer.build_plugin_layer(plugin, input_types(trt), shapes, {"batch": (1, 2, 4)})

        assert layer.output_types == [trt.float32]
        assert layer.kernel_name == kernels.KERNEL_NAME and layer.ptx == ptx.encode()
        assert [a.dtype for a in layer.extra_args] == [trt.PluginArgDataType.INT32] * len(kernels.KERNEL_INT_ARGS)
        attrs = BinaryConvAttrs.from_onnx({a.name: helper.get_attribute_value(a) for a in node.attribute})
        w_packed = initializer(model, node.input[1])
        weights = unpack_weights(w_packed, attrs.group_channels).astype(np.float32)
        alpha, bias, slope = (initializer(model, name) for name in (*node.input[2:4], node.input[5]))
        for n, values in runs.items():
            env = {"batch": n}
            x, y = values[node.input[0]], values[node.output[0]]
            residual = initializer(model, node.input[4]) if stored(model, node.input[4]) else values[node.input[4]]
            got_shape = tuple(importer.evaluate(e, env) for e in layer.output_shapes[0])
            assert got_shape == (n, w_packed.shape[0], *attrs.output_size(*x.shape[2:])) == y.shape, node.name
            if batch_mode == "1":  # the NumPy reference is slow; the static export has the same layers
                _, reference = binary_conv2d_ref(x, weights, alpha, bias, attrs, residual=residual, slope=slope)
                assert np.array_equal(reference, y), node.name  # the inputs taken here are the node's own
            geometry = kernels.launch_geometry(x.shape, w_packed.shape[0], attrs)
            launch = {key: importer.evaluate(value, env) for key, value in layer.launch.items()}
            assert launch == dict(zip(("grid_x", "grid_y", "grid_z"), geometry.grid, strict=True)) | dict(
                zip(("block_x", "block_y", "block_z"), geometry.block, strict=True)) | {"shared_mem": 0}  # fmt: skip
            values = [importer.evaluate(a, env) for a in layer.extra_args]
            assert values == kernels.kernel_int_args(x.shape, w_packed.shape[0], attrs,
                                                     has_residual=residual.size > 0), node.name  # fmt: skip
            args = dict(zip(kernels.KERNEL_INT_ARGS, values, strict=True))
            # ... and each argument is what the node and its real tensors say, independently of kernels.py:
            (kh, kw), (sh, sw), (dh, dw) = attrs.kernel_shape, attrs.strides, attrs.dilations
            assert (args["n"], args["c"], args["h"], args["w"]) == x.shape
            assert (args["out_channels"], args["out_h"], args["out_w"]) == y.shape[1:]
            assert (args["kernel_h"], args["kernel_w"], args["stride_h"], args["stride_w"]) == (kh, kw, sh, sw)
            assert (args["pad_top"], args["pad_left"], args["dilation_h"], args["dilation_w"]) == (
                *attrs.pads[:2], dh, dw)  # fmt: skip
            assert np.int32(args["threshold_bits"]).view(np.float32) == np.float32(attrs.threshold)
            assert (args["group"], args["zero_sign"], args["pad_value"]) == (attrs.group, attrs.zero_sign,
                                                                             attrs.pad_value)  # fmt: skip
            assert (args["activation"], args["has_residual"]) == (ACTIVATIONS.index(attrs.activation),
                                                                  int(residual.shape == y.shape))  # fmt: skip
            assert launch["grid_x"] * 32 >= y.shape[2] * y.shape[3] and launch["grid_z"] == n


def first_binary_node(model: onnx.ModelProto) -> tuple[onnx.NodeProto, list[tuple[int, ...]]]:
    """The first tod node and its input shapes at a 32x32 input (a graph-computed residual has Y's shape)."""
    node = binary_nodes(model)[0]
    attrs = BinaryConvAttrs.from_onnx({a.name: helper.get_attribute_value(a) for a in node.attribute})
    x_shape = (1, attrs.in_channels, 32, 32)
    y_shape = (1, initializer(model, node.input[1]).shape[0], *attrs.output_size(32, 32))
    shapes = [x_shape, *(initializer(model, name).shape if stored(model, name) else y_shape
                         for name in node.input[1:])]  # fmt: skip
    return node, shapes


ONE_EXPORT = pytest.mark.parametrize("export", [EXPORTS[0]], indirect=True, ids=["-".join(EXPORTS[0])])


@ONE_EXPORT
def test_packed_weights_of_another_type_are_refused_clearly(trt: Any, export: tuple[str, onnx.ModelProto]) -> None:
    view = plugins.tensorrt_view(export[1])
    node, shapes = first_binary_node(view)
    plugin = importer.create_plugin(trt, node)
    with pytest.raises(UserError, match="input w_packed is DataType.UINT8, the kernel reads DataType.INT32"):
        importer.build_plugin_layer(plugin, [trt.float32, trt.uint8, *input_types(trt)[2:]], shapes, {})


@ONE_EXPORT
def test_a_node_without_its_default_attributes_still_builds(trt: Any, export: tuple[str, onnx.ModelProto]) -> None:
    """Attributes reach aot_impl positionally in the parser's order: tensorrt_view writes all ten."""
    model = onnx.ModelProto()
    model.CopyFrom(export[1])
    node = binary_nodes(model)[0]
    kept = [a for a in node.attribute if a.name not in ("threshold", "zero_sign", "pad_value", "group")]
    del node.attribute[:]
    node.attribute.extend(kept)
    view_node, shapes = first_binary_node(plugins.tensorrt_view(model))
    assert {a.name for a in view_node.attribute} == {*BinaryConvAttrs(kernel_shape=(3, 3), in_channels=1).to_onnx(),
                                                     plugins.NAMESPACE_ATTR, plugins.AOT_ATTR}  # fmt: skip
    plugin = importer.create_plugin(trt, view_node)
    layer = importer.build_plugin_layer(plugin, input_types(trt), shapes, {})
    values = dict(zip(kernels.KERNEL_INT_ARGS, (importer.evaluate(a, {}) for a in layer.extra_args), strict=True))
    assert (values["group"], values["zero_sign"], values["pad_value"], values["threshold_bits"]) == (1, -1, 0, 0)
    assert (values["activation"], values["has_residual"]) == (ACTIVATIONS.index("prelu"), 1)
    # The raw node (no namespace, missing fields) is what the parser would have choked on:
    assert importer.create_plugin(trt, node) is not None
    with pytest.raises(TypeError, match="missing"):
        importer.build_plugin_layer(importer.create_plugin(trt, node), input_types(trt), shapes, {})


def version_1_model() -> tuple[onnx.ModelProto, BinaryConvAttrs, tuple[int, ...]]:
    """A file written before the epilogue: four inputs, nine attributes, opset tod 1."""
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=8, strides=(2, 2), pads=(1, 1, 1, 1), zero_sign=1)
    rng = np.random.default_rng(1)
    packed = pack_weights(rng.standard_normal((12, 8, 3, 3)).astype(np.float32), attrs.zero_sign)
    fields = {k: v for k, v in attrs.to_onnx().items() if k != "activation"}
    node = helper.make_node(OP_TYPE, ["x", "w", "alpha", "bias"], ["y"], name="bconv", domain=DOMAIN, **fields)
    inits = [onnx.numpy_helper.from_array(a, name) for a, name in (
        (packed, "w"), (rng.random(12).astype(np.float32), "alpha"), (np.zeros(12, np.float32), "bias"))]  # fmt: skip
    x_shape = (2, 8, 15, 16)
    graph = helper.make_graph([node], "v1", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets), attrs, x_shape


def test_a_version_1_node_builds_as_activation_none(trt: Any) -> None:
    """tensorrt_view upgrades a version-1 node (the empty residual and slope, activation "none"), and the
    plugin layer takes it with the one six-input signature: no residual, no activation."""
    model, attrs, x_shape = version_1_model()
    view = plugins.tensorrt_view(model)
    (node,) = binary_nodes(view)
    assert list(node.input) == ["x", "w", "alpha", "bias", NONE_INPUT, NONE_INPUT]
    assert [(o.domain, o.version) for o in view.opset_import if o.domain == DOMAIN] == [(DOMAIN, 2)]
    written = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert list(written) == [*attrs.to_onnx(), plugins.NAMESPACE_ATTR, plugins.AOT_ATTR]  # all ten, in order
    assert written["activation"] == b"none" and initializer(view, NONE_INPUT).shape == (0,)
    assert initializer(view, NONE_INPUT).dtype == np.float32 and len(binary_nodes(model)[0].input) == 4
    plugin = importer.create_plugin(trt, node)
    assert isinstance(plugin, trt.IPluginV3QuickAOTBuild)
    shapes = [("batch", *x_shape[1:]), *(initializer(view, name).shape for name in node.input[1:])]
    layer = importer.build_plugin_layer(plugin, input_types(trt), shapes, {"batch": (1, 2, 4)})
    assert layer.output_types == [trt.float32] and layer.kernel_name == kernels.KERNEL_NAME
    env = {"batch": 2}
    assert tuple(importer.evaluate(e, env) for e in layer.output_shapes[0]) == (2, 12, *attrs.output_size(15, 16))
    values = [importer.evaluate(a, env) for a in layer.extra_args]
    assert values == kernels.kernel_int_args(x_shape, 12, attrs, has_residual=False)
    named = dict(zip(kernels.KERNEL_INT_ARGS, values, strict=True))
    assert (named["activation"], named["has_residual"], named["zero_sign"]) == (0, 0, 1)


def test_epilogue_inputs_that_disagree_with_the_activation_are_refused(trt: Any) -> None:
    """prelu without its slopes (or slopes without prelu) is one clear error at build time, not a bad read."""
    model, _, x_shape = version_1_model()
    view = plugins.tensorrt_view(model)
    (node,) = binary_nodes(view)
    shapes = [x_shape, *(initializer(view, name).shape for name in node.input[1:])]
    for attr in node.attribute:
        if attr.name == "activation":
            attr.s = b"prelu"
    with pytest.raises(UserError, match=r"input slope has shape \[0\]; with activation 'prelu' it must be \[12\]"):
        importer.build_plugin_layer(importer.create_plugin(trt, node), input_types(trt), shapes, {})
    with pytest.raises(UserError, match=r"input residual has shape \[2, 12, 3, 3\]; it must be Y's \[2, 12, 8, 8\]"):
        wrong = [*shapes[:4], (2, 12, 3, 3), (12,)]
        importer.build_plugin_layer(importer.create_plugin(trt, node), input_types(trt), wrong, {})
