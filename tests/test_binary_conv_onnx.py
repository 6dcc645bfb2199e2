"""tod::BinaryConv2d through ONNX: plugin mode (onnxruntime via onnxruntime-extensions and the
compiled kernel), decompose mode (standard ops), the fold pass, the torch custom op, file size.

One model with many BinaryConv2d branches (every sign(0) and padding convention, strides,
dilation, groups, learned thresholds and scales) is exported once per mode, so each export
covers the whole grid.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tod_deploy.backends.onnxruntime_runner import new_session
from tod_deploy.errors import UserError
from tod_deploy.nn.binary import BinaryConv2d
from tod_deploy.ops import ort_binary_conv
from tod_deploy.ops.binary_conv_onnx import export_onnx, prepare_for_export
from tod_deploy.ops.binary_conv_ref import VERSION, BinaryConvAttrs, binary_conv2d_ref, pack_weights, unpack_weights
from tod_deploy.ops.binary_conv_versions import NONE_INPUT, domain_version, upgrade_to_v2

C_IN = 17
SIGNS = (-1, 0, 1)


def _branches() -> list[BinaryConv2d]:
    torch.manual_seed(0)
    layers = []
    for i, (zero_sign, pad_value) in enumerate(itertools.product(SIGNS, SIGNS)):
        layers.append(
            BinaryConv2d(
                C_IN,
                [5, 33, 65][i % 3],
                3,
                stride=1 + i % 2,
                padding=1 + (i % 3 == 2),
                dilation=1 + (i % 3 == 2),
                bias=i % 2 == 0,
                alpha="learned" if i % 4 == 1 else "mean_abs",
                zero_sign=zero_sign,
                pad_value=pad_value,
                threshold=[0.0, 0.25, -0.5][i % 3],
            )
        )
    layers.append(BinaryConv2d(C_IN, 9, 3, padding=1, threshold="learned", zero_sign=0, bias=True))
    layers.append(BinaryConv2d(C_IN - 1, 6, 1, groups=2, zero_sign=1, pad_value=-1))  # fed 16 channels
    # alpha = 1, no bias: the output is the integer sum itself
    layers.append(BinaryConv2d(C_IN, 33, 3, padding=1, alpha="learned", zero_sign=0, pad_value=0))
    with torch.no_grad():
        layers[-1].alpha.fill_(1.0)
        layers[-3].threshold.copy_(torch.linspace(-0.5, 0.5, C_IN))
        for layer in layers:
            if layer.bias is not None:
                layer.bias.uniform_(-1, 1)
    return layers


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_branches())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(b(x[:, : b.in_channels]) for b in self.branches)


@pytest.fixture(scope="module")
def model_and_input() -> tuple[Branches, torch.Tensor]:
    x = torch.randint(-4, 5, (2, C_IN, 9, 10)).float() * 0.25  # many values exactly on thresholds and 0
    return Branches().eval(), x


def _references(model: Branches, x: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    refs = []
    for layer in model.branches:
        threshold = None if layer.threshold is None else layer.threshold.detach().numpy()
        bias = None if layer.bias is None else layer.bias.detach().numpy()
        xin = x[:, : layer.in_channels].numpy()
        refs.append(
            binary_conv2d_ref(
                xin, layer.weight.detach().numpy(), layer.scale().detach().numpy(), bias, layer.op_attrs(), threshold
            )
        )
    return refs


def _check_against_reference(outputs: list[np.ndarray], model: Branches, x: torch.Tensor) -> None:
    refs = _references(model, x)
    assert len(outputs) == len(refs)
    for out, (_, scaled) in zip(outputs, refs, strict=True):
        np.testing.assert_allclose(out, scaled, rtol=1e-5, atol=1e-6)
    assert np.array_equal(outputs[-1], refs[-1][0].astype(np.float32))  # the identity-scale branch: exact sums


@pytest.mark.parametrize("mode", ["plugin", "decompose"])
def test_exported_model_matches_reference_in_onnxruntime(mode: str, model_and_input) -> None:
    model, x = model_and_input
    proto = export_onnx(model, (x,), mode)  # type: ignore[arg-type]
    ops = {(node.domain, node.op_type) for node in proto.graph.node}
    if mode == "plugin":
        assert ("tod", "BinaryConv2d") in ops and ("", "Conv") not in ops
    else:
        assert all(domain in ("", "ai.onnx") for domain, _ in ops) and ("", "Conv") in ops
    session = new_session(proto, threads=2)
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    _check_against_reference(outputs, model, x)
    with torch.no_grad():  # and bit for bit what PyTorch computes
        for out, want in zip(outputs, model(x), strict=True):
            assert np.array_equal(out, want.numpy())


def test_packed_module_runs_the_kernel_in_pytorch(model_and_input) -> None:
    model, x = model_and_input
    packed = prepare_for_export(model, "plugin")
    assert not any(isinstance(m, BinaryConv2d) for m in packed.modules())
    with torch.no_grad():
        outputs = [t.numpy() for t in packed(x)]
    _check_against_reference(outputs, model, x)


def test_plugin_file_stores_weights_in_one_bit_each(tmp_path) -> None:
    layer = BinaryConv2d(128, 128, 3, padding=1, bias=True)
    proto = export_onnx(layer, (torch.randn(1, 128, 8, 8),), "plugin")
    path = tmp_path / "binary.onnx"
    onnx.save(proto, path)
    weights = 128 * 128 * 9
    packed = [init for init in proto.graph.initializer if init.data_type == TensorProto.UINT8]
    assert len(packed) == 1 and np.prod(packed[0].dims) * 8 == weights
    assert path.stat().st_size < 1.25 * weights / 8  # 18 KiB of bits + alpha, bias and the graph


def test_fold_pass_absorbs_explicit_sign_and_scalar_threshold() -> None:
    class Explicit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = BinaryConv2d(6, 4, 3, padding=1, zero_sign=0)
            self.b = BinaryConv2d(6, 4, 3, padding=1, zero_sign=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(torch.sign(x - 0.25)), self.b(x + 0.5)

    model = Explicit().eval()
    x = torch.randint(-4, 5, (2, 6, 5, 5)).float() * 0.25
    folded = export_onnx(model, (x,), "plugin")
    raw = export_onnx(model, (x,), "plugin", fold=False)
    nodes = [(n.op_type, {a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in folded.graph.node]
    assert [op for op, _ in nodes] == ["BinaryConv2d", "BinaryConv2d"]
    assert sorted(attrs["threshold"] for _, attrs in nodes) == [-0.5, 0.25]
    assert len(raw.graph.node) > 2
    outs = [new_session(p).run(None, {p.graph.input[0].name: x.numpy()}) for p in (folded, raw)]
    with torch.no_grad():
        want = [t.numpy() for t in model(x)]
    for got in outs:
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def _v1_attrs(attrs: BinaryConvAttrs) -> dict[str, object]:
    """The nine attributes a version-1 node (tod-deploy before the fused epilogue) carried."""
    return {k: v for k, v in attrs.to_onnx().items() if k != "activation"}


def _hand_made_model(attrs: BinaryConvAttrs, cout: int) -> onnx.ModelProto:
    """A version-1 file, as tod-deploy wrote them before op version 2: four inputs, nine attributes, tod opset 1."""
    w = np.random.default_rng(0).standard_normal((cout, attrs.group_channels, *attrs.kernel_shape)).astype(np.float32)
    inits = [
        numpy_helper.from_array(pack_weights(w, attrs.zero_sign), "W_packed"),
        numpy_helper.from_array(np.ones(cout, np.float32), "alpha"),
        numpy_helper.from_array(np.zeros(cout, np.float32), "bias"),
    ]
    node = helper.make_node("BinaryConv2d", ["X", "W_packed", "alpha", "bias"], ["Y"], domain="tod", **_v1_attrs(attrs))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tod", 1)])
    model.ir_version = 10
    return model


def test_bad_input_in_onnxruntime_is_a_user_error_not_an_abort() -> None:
    """tod-deploy's own session, and a user's session with the onnxruntime-extensions hook."""
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=8, pads=(1, 1, 1, 1))
    model = _hand_made_model(attrs, 4)
    sessions = [new_session(model)]
    options = ort_binary_conv.session_options()  # installs the hook where this onnxruntime-extensions has one
    if ort_binary_conv.array_hook_installed():
        sessions.append(ort_binary_conv.BinaryConvSession(upgrade_to_v2(model).SerializeToString(), options))
    for session in sessions:
        assert session.run(None, {"X": np.ones((1, 8, 4, 4), np.float32)})[0].shape == (1, 4, 4, 4)
        with pytest.raises(UserError, match="not \\[N, 8, H, W\\]"):
            session.run(None, {"X": np.ones((1, 7, 4, 4), np.float32)})
    assert len(sessions) == 2 or not ort_binary_conv.array_hook_installed()


def test_plugin_zero_weights_with_zero_sign_0_name_the_layer() -> None:
    model = nn.Sequential(nn.Identity(), BinaryConv2d(4, 2, 3, zero_sign=0))
    with torch.no_grad():
        model[1].weight[1, 0, 0, 0] = 0.0
    with pytest.raises(UserError, match="^1: .*output channel 1"):
        prepare_for_export(model, "plugin")
    prepare_for_export(model, "decompose")  # +-1/0 float weights: fine
    with pytest.raises(UserError, match="mode"):
        prepare_for_export(model, "fast")  # type: ignore[arg-type]


def test_the_reused_output_buffer_never_leaks_between_nodes_or_calls() -> None:
    """The hook writes every call into one array per thread and shape: two chained nodes of the same
    shape, and two runs whose first result is kept, must still give the reference's answers."""
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=8, pads=(1, 1, 1, 1))
    model = _hand_made_model(attrs, 8)
    first = model.graph.node[0]
    second = helper.make_node(
        "BinaryConv2d", ["Y", "W_packed", "alpha", "bias"], ["Z"], domain="tod", **_v1_attrs(attrs)
    )
    del first.output[:]
    first.output.append("Y")
    model.graph.node.append(second)
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Z")])
    session = new_session(model)
    packed = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W_packed"))
    weight = unpack_weights(packed, attrs.group_channels)
    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1, 8, 6, 6)).astype(np.float32) for _ in range(2)]
    kept = [session.run(None, {"X": x}) for x in inputs]
    for x, (y, z) in zip(inputs, kept, strict=True):
        y_ref = binary_conv2d_ref(x, weight, ones, zeros, attrs)[1]
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(z, binary_conv2d_ref(y_ref, weight, ones, zeros, attrs)[1])
    assert not np.array_equal(kept[0][1], kept[1][1])


def test_version_1_files_load_and_run_as_version_2(tmp_path) -> None:
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=8, pads=(1, 1, 1, 1), zero_sign=0)
    model = _hand_made_model(attrs, 5)
    no_bias = helper.make_node("BinaryConv2d", ["X", "W_packed", "alpha"], ["Z"], domain="tod", **_v1_attrs(attrs))
    model.graph.node.append(no_bias)  # the version-1 schema allowed a node without bias
    model.graph.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, None))
    path = tmp_path / "v1.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    upgraded = upgrade_to_v2(model)
    assert domain_version(model) == 1 and domain_version(upgraded) == VERSION
    for node in upgraded.graph.node:
        assert list(node.input[4:]) == [NONE_INPUT, NONE_INPUT]
        assert BinaryConvAttrs.from_onnx({a.name: helper.get_attribute_value(a) for a in node.attribute}) == attrs
    x = np.random.default_rng(2).integers(-4, 5, (2, 8, 6, 7)).astype(np.float32) * 0.25
    weight = unpack_weights(numpy_helper.to_array(model.graph.initializer[0]), 8)
    want = binary_conv2d_ref(x, weight, np.ones(5, np.float32), None, attrs)[1]
    for source in (path, model):  # a file on disk and a proto, as the session factory gets them
        y, z = new_session(source).run(None, {"X": x})
        assert np.array_equal(y, want) and np.array_equal(z, want)
    assert path.read_bytes() == before  # upgraded in memory, the user's file untouched


class BiRealBlocks(nn.Module):
    """Fusable chains (conv -> Add -> PReLU / ReLU) and chains the pass must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.convs = nn.ModuleList(BinaryConv2d(16, 16, 3, padding=1, bias=True) for _ in range(6))
        self.prelu = nn.PReLU(16)
        self.prelu_shared = nn.PReLU()  # one slope for all channels
        with torch.no_grad():
            self.prelu.weight.uniform_(-0.5, 0.5)
            for conv in self.convs:
                conv.bias.uniform_(-2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.prelu(self.convs[0](x) + x)  # Bi-Real block: fused, residual + prelu
        b = torch.relu(a + self.convs[1](a))  # residual first operand, relu: fused
        c = self.prelu_shared(self.convs[2](b))  # activation only: fused
        d = self.convs[3](c) + c  # residual only: fused
        e = self.convs[4](d)
        f = torch.relu(e + 1.0)  # broadcast Add: not a residual, not fused
        g = self.convs[5](d)
        return f, torch.relu(g), g * 2.0  # g read twice: not fused


def test_fuse_pass_folds_residual_and_activation_and_changes_no_bit() -> None:
    model = BiRealBlocks().eval()
    x = torch.randint(-8, 9, (1, 16, 12, 11)).float() * 0.25
    fused = export_onnx(model, (x,), "plugin")
    unfused = export_onnx(model, (x,), "plugin-unfused")
    nodes = [n for n in fused.graph.node if n.op_type == "BinaryConv2d"]
    epilogues = []
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        epilogues.append((attrs["activation"].decode(), node.input[4] != NONE_INPUT))
    assert epilogues == [("prelu", True), ("relu", True), ("prelu", False), ("none", True), ("none", False),
                         ("none", False)]  # fmt: skip
    slopes = numpy_helper.to_array(next(i for i in fused.graph.initializer if i.name == nodes[2].input[5]))
    assert slopes.shape == (16,) and np.all(slopes == slopes[0])  # the shared slope, per channel
    unfused_ops = [n.op_type for n in unfused.graph.node]
    assert unfused_ops.count("PRelu") == 2 and unfused_ops.count("Add") == 4
    assert [n.op_type for n in fused.graph.node].count("Add") == 1  # only the broadcast one is left
    assert domain_version(fused) == VERSION and domain_version(unfused) == VERSION
    feeds = {"x": x.numpy()}
    got = new_session(fused, threads=2).run(None, {fused.graph.input[0].name: x.numpy()})
    plain = new_session(unfused, threads=2).run(None, {unfused.graph.input[0].name: feeds["x"]})
    with torch.no_grad():
        want = [t.numpy() for t in model(x)]
    for a, b, c in zip(got, plain, want, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert (want[0] > 0).any() and (want[0] == 0).any()  # both sides of the activations were exercised
