"""The tod::BinaryConv2d plugin driven through TensorRT 11.4's real Python plugin layer.

NVIDIA's ``tensorrt.plugin`` code from the ``tensorrt-cu13-bindings`` wheel (unchanged) runs over a
stand-in for its compiled core (``tensorrt_standin.py``); the plugin fields are built from real
DFR-Det exports as onnx-tensorrt's importer builds them, and the builder's calls are TensorRT's
(``tensorrt_importer.py``). What comes out (output types and shapes, launch grid, the kernel's extra
arguments, the PTX) is compared with kernels.py and the NumPy reference on the nodes' real inputs.
Without a GPU the device is a stand-in too: compute capability 8.0 (PTX built here by nvcc).
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
from tod_deploy.ops.binary_conv_ref import DOMAIN, OP_TYPE, BinaryConvAttrs, binary_conv2d_ref, unpack_weights
from tod_deploy.trt import kernels, plugins

pytestmark = standin.IGNORE_WHEEL_WARNINGS

SIZE = "128x128"  # FPN P2..P6: the coarsest level is still 2x2
EXPORTS = [(detector, batch) for detector in ("fcos", "retinanet", "faster_rcnn") for batch in ("1", "dynamic")]
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
    plugins._register.cache_clear()
    with standin.python_layer(standin.python_layer_dir_or_skip()) as module, pytest.MonkeyPatch.context() as patch:
        patch.setattr(plugins, "require_cuda", DeviceStandIn, )
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
    """Every tod node's X and Y on seeded images, from onnxruntime running the export itself."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = {name for node in binary_nodes(model) for name in (node.input[0], node.output[0])}
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


def test_registration_through_tensorrt_plugin_layer(trt: Any) -> None:
    import tensorrt.plugin as trtp

    definition = trtp.op.tod.BinaryConv2d
    assert definition.plugin_id == plugins.PLUGIN_ID
    assert definition.input_tensor_names == list(plugins.INPUT_NAMES)
    assert list(definition.input_attrs) == [*("kernel_shape", "strides", "pads", "dilations"), "group",
                                            "in_channels", "threshold", "zero_sign", "pad_value"]  # fmt: skip
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
        assert w_view.dtype == np.int32
        types = [trt.float32, trt.int32, trt.float32, trt.float32]
        shapes = [x_dims, w_view.shape, *(initializer(view, name).shape for name in node.input[2:])]
        layer = importer.build_plugin_layer(plugin, types, shapes, {"batch": (1, 2, 4)})

        assert layer.output_types == [trt.float32]
        assert layer.kernel_name == kernels.KERNEL_NAME and layer.ptx == ptx.encode()
        assert [a.dtype for a in layer.extra_args] == [trt.PluginArgDataType.INT32] * len(kernels.KERNEL_INT_ARGS)
        attrs = BinaryConvAttrs.from_onnx({a.name: helper.get_attribute_value(a) for a in node.attribute})
        w_packed = initializer(model, node.input[1])
        weights = unpack_weights(w_packed, attrs.group_channels).astype(np.float32)
        alpha, bias = (initializer(model, name) for name in node.input[2:])
        for n, values in runs.items():
            env = {"batch": n}
            x, y = values[node.input[0]], values[node.output[0]]
            got_shape = tuple(importer.evaluate(e, env) for e in layer.output_shapes[0])
            assert got_shape == (n, w_packed.shape[0], *attrs.output_size(*x.shape[2:])) == y.shape, node.name
            if batch_mode == "1":  # the NumPy reference is slow; the static export has the same layers
                _, reference = binary_conv2d_ref(x, weights, alpha, bias, attrs)
                assert np.array_equal(reference, y), node.name  # the inputs taken here are the node's own
            geometry = kernels.launch_geometry(x.shape, w_packed.shape[0], attrs)
            launch = {key: importer.evaluate(value, env) for key, value in layer.launch.items()}
            assert launch == dict(zip(("grid_x", "grid_y", "grid_z"), geometry.grid, strict=True)) | dict(
                zip(("block_x", "block_y", "block_z"), geometry.block, strict=True)) | {"shared_mem": 0}  # fmt: skip
            values = [importer.evaluate(a, env) for a in layer.extra_args]
            assert values == kernels.kernel_int_args(x.shape, w_packed.shape[0], attrs), node.name
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
            assert launch["grid_x"] * 32 >= y.shape[2] * y.shape[3] and launch["grid_z"] == n


def first_binary_node(model: onnx.ModelProto) -> tuple[onnx.NodeProto, list[tuple[int, ...]]]:
    node = binary_nodes(model)[0]
    shapes = [(1, 64, 32, 32), *(initializer(model, name).shape for name in node.input[1:])]
    return node, shapes


ONE_EXPORT = pytest.mark.parametrize("export", [EXPORTS[0]], indirect=True, ids=["-".join(EXPORTS[0])])


@ONE_EXPORT
def test_packed_weights_of_another_type_are_refused_clearly(trt: Any, export: tuple[str, onnx.ModelProto]) -> None:
    view = plugins.tensorrt_view(export[1])
    node, shapes = first_binary_node(view)
    plugin = importer.create_plugin(trt, node)
    with pytest.raises(UserError, match="input w_packed is DataType.UINT8, the kernel reads DataType.INT32"):
        importer.build_plugin_layer(plugin, [trt.float32, trt.uint8, trt.float32, trt.float32], shapes, {})


@ONE_EXPORT
def test_a_node_without_its_default_attributes_still_builds(trt: Any, export: tuple[str, onnx.ModelProto]) -> None:
    """Attributes reach aot_impl positionally in the parser's order: tensorrt_view writes all nine."""
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
    layer = importer.build_plugin_layer(plugin, [trt.float32, trt.int32, trt.float32, trt.float32], shapes, {})
    values = dict(zip(kernels.KERNEL_INT_ARGS, (importer.evaluate(a, {}) for a in layer.extra_args), strict=True))
    assert (values["group"], values["zero_sign"], values["pad_value"], values["threshold_bits"]) == (1, -1, 0, 0)
    # The raw node (no namespace, missing fields) is what the parser would have choked on:
    assert importer.create_plugin(trt, node) is not None
    with pytest.raises(TypeError, match="missing"):
        importer.build_plugin_layer(importer.create_plugin(trt, node), [trt.float32, trt.int32, trt.float32,
                                                                        trt.float32], shapes, {})  # fmt: skip
