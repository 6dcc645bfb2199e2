"""tod::BinaryConv2d: the NumPy reference, the compiled CPU kernel on every ISA path, the PyTorch module.

Every implementation is compared with ``binary_conv_ref``: integer sums bit for bit, scaled
outputs to 1e-5 relative. Inputs are multiples of 0.25 so that many values sit exactly on the
threshold (and on 0), which is where sign conventions differ.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import multiprocessing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tod_deploy.errors import UserError
from tod_deploy.nn.binary import BinaryConv2d, RPReLU, RSign, sign_ste
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.ops.binary_conv_cases import (
    ACTIVATION_CASES,
    GEOMETRIES,
    SIGNS,
    Geometry,
    case_id,
    epilogue_inputs,
    make_inputs,
)
from tod_deploy.ops.binary_conv_ref import (
    BinaryConvAttrs,
    apply_epilogue,
    binarize,
    binary_conv2d_ref,
    pack_weights,
    unpack_weights,
)


@functools.cache
def reference(geo: Geometry, zero_sign: int, pad_value: int) -> tuple[np.ndarray, np.ndarray]:
    x, w, alpha, bias = make_inputs(geo)
    return binary_conv2d_ref(x, w, alpha, bias, geo.attrs(zero_sign, pad_value))


def assert_scaled_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


# --- the reference itself ----------------------------------------------------------------------


def test_binarize_conventions() -> None:
    values = np.array([-1.0, -0.0, 0.0, 0.5, 2.0, np.nan], dtype=np.float32)
    assert binarize(values, 0.0, -1).tolist() == [-1, -1, -1, 1, 1, -1]
    assert binarize(values, 0.0, 0).tolist() == [-1, 0, 0, 1, 1, 0]
    assert binarize(values, 0.5, 1).tolist() == [-1, -1, -1, 1, 1, 1]


def test_reference_matches_direct_sum() -> None:
    """The vectorised reference equals the definition written as loops (tiny case)."""
    geo = Geometry(5, 3, 4, 5, stride=2, pads=(1, 0, 2, 1), threshold=0.25)
    attrs = geo.attrs(zero_sign=0, pad_value=-1)
    x, w, alpha, bias = make_inputs(geo)
    sums, out = binary_conv2d_ref(x, w, alpha, bias, attrs)
    xb = np.pad(binarize(x, 0.25, 0), ((0, 0), (0, 0), (1, 2), (0, 1)), constant_values=-1).astype(int)
    wb = binarize(w, 0.0, 0).astype(int)
    for n, o, y, xx in itertools.product(range(2), range(3), range(sums.shape[2]), range(sums.shape[3])):
        patch = xb[n, :, y * 2 : y * 2 + 3, xx * 2 : xx * 2 + 3]
        assert sums[n, o, y, xx] == int((patch * wb[o]).sum())
    assert out.dtype == np.float32 and np.array_equal(
        out, alpha[None, :, None, None] * sums.astype(np.float32) + bias[None, :, None, None]
    )


def test_weight_packing_format() -> None:
    """Channel c of tap (ky, kx) is bit c % 64 of little-endian word c // 64; padding bits are 0."""
    w = -np.ones((2, 70, 1, 2), dtype=np.float32)
    w[0, 0, 0, 0] = w[0, 9, 0, 0] = w[0, 64, 0, 0] = w[1, 69, 0, 1] = 1.0
    packed = pack_weights(w, zero_sign=-1)
    assert packed.shape == (2, 1, 2, 16) and packed.dtype == np.uint8
    words = packed.view("<u8")  # [2, 1, 2, 2]
    assert words[0, 0, 0].tolist() == [(1 << 0) | (1 << 9), 1 << 0]
    assert words[1, 0, 1].tolist() == [0, 1 << 5]
    assert words[0, 0, 1].tolist() == [0, 0]
    assert np.array_equal(unpack_weights(packed, 70), np.where(w > 0, 1, -1))


def test_zero_weights_with_zero_sign_0_are_rejected_by_name() -> None:
    w = np.ones((4, 3, 3, 3), dtype=np.float32)
    w[2, 1, 0, 0] = 0.0
    assert pack_weights(w, zero_sign=1).shape == (4, 3, 3, 8)  # zero -> +1 fits in a bit
    with pytest.raises(UserError, match="backbone.layer1.0.conv1.*output channel 2"):
        pack_weights(w, zero_sign=0, layer="backbone.layer1.0.conv1")


def test_attribute_validation_and_onnx_encoding() -> None:
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=64, pads=(1, 1, 1, 1), threshold=0.5, zero_sign=0)
    encoded = attrs.to_onnx()
    assert encoded["kernel_shape"] == "3,3" and encoded["pads"] == "1,1,1,1" and encoded["zero_sign"] == 0
    assert BinaryConvAttrs.from_onnx(encoded) == attrs
    assert BinaryConvAttrs.from_onnx({**encoded, "pads": [1, 1, 1, 1]}) == attrs
    with pytest.raises(UserError, match="zero_sign=2"):
        BinaryConvAttrs(kernel_shape=(3, 3), in_channels=4, zero_sign=2)
    with pytest.raises(UserError, match="pad_value=3"):
        BinaryConvAttrs(kernel_shape=(3, 3), in_channels=4, pad_value=3)
    with pytest.raises(UserError, match="group=3"):
        BinaryConvAttrs(kernel_shape=(3, 3), in_channels=4, group=3)
    with pytest.raises(UserError, match="does not fit"):
        BinaryConvAttrs(kernel_shape=(5, 5), in_channels=4).output_size(3, 3)


# --- the compiled kernel, every ISA path --------------------------------------------------------


def _isa_param(name: str) -> object:
    ok = binary_conv_cpu.available() and name in binary_conv_cpu.supported_isas()
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"this CPU cannot run the {name} path"))


ISA_PARAMS = [_isa_param(name) for name in binary_conv_cpu.ISAS]


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=case_id)
def test_kernel_matches_reference(isa: str, geo: Geometry) -> None:
    x, w, alpha, bias = make_inputs(geo)
    for zero_sign, pad_value in itertools.product(SIGNS, SIGNS):
        attrs = geo.attrs(zero_sign, pad_value)
        want_sums, want_out = reference(geo, zero_sign, pad_value)
        try:
            packed = pack_weights(w, zero_sign)
        except UserError:  # pragma: no cover - random normal weights are never exactly 0
            pytest.fail("unexpected zero weight")
        out, sums = binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, attrs, isa=isa, return_sums=True)
        assert np.array_equal(sums, want_sums), f"sums differ for zero_sign={zero_sign} pad_value={pad_value}"
        assert_scaled_close(out, want_out)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATION_CASES)
def test_kernel_fused_epilogue_is_bit_exact(isa: str, activation: str) -> None:
    """Residual and activation (op version 2) on every geometry and sign convention, bit for bit."""
    for geo in GEOMETRIES:
        x, w, alpha, bias = make_inputs(geo)
        for zero_sign, pad_value in itertools.product(SIGNS, SIGNS):
            attrs = dataclasses.replace(geo.attrs(zero_sign, pad_value), activation=activation)
            _, plain = reference(geo, zero_sign, pad_value)
            residual, slope = epilogue_inputs(plain, activation)
            packed = pack_weights(w, zero_sign)
            for res in (residual, None):
                _, want = binary_conv2d_ref(x, w, alpha, bias, attrs, residual=res, slope=slope)
                got = binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, attrs, residual=res, slope=slope, isa=isa)
                assert np.array_equal(got, want), f"{case_id(geo)} zero_sign={zero_sign} pad_value={pad_value}"
                assert np.array_equal(np.signbit(got), np.signbit(want))  # -0.0 too


def test_epilogue_is_what_onnx_add_then_prelu_or_relu_compute() -> None:
    """The reference's step 6 against onnxruntime's own Add, PRelu and Relu: fusing them changes no bit."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    y = (rng.standard_normal((2, 6, 5, 7)) * 3).astype(np.float32)
    residual, slope = epilogue_inputs(y, "prelu", seed=5)
    shape = list(y.shape)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["y", "residual"], ["sum"]),
            helper.make_node("PRelu", ["sum", "slope"], ["prelu"]),
            helper.make_node("Relu", ["sum"], ["relu"]),
        ],
        "epilogue",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("y", "residual")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("sum", "prelu", "relu")],
        [numpy_helper.from_array(slope.reshape(-1, 1, 1), "slope")],  # as torch exports nn.PReLU(C)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    added, prelu, relu = session.run(None, {"y": y, "residual": residual})
    assert np.array_equal(apply_epilogue(y, "none", residual), added)
    assert np.array_equal(apply_epilogue(y, "prelu", residual, slope), prelu)
    assert np.array_equal(apply_epilogue(y, "relu", residual), relu)
    assert (added == 0).sum() >= y.size // 7  # the boundary is exercised


def test_kernel_fused_epilogue_bad_input() -> None:
    geo = Geometry(17, 4, 5, 5)
    x, w, alpha, bias = make_inputs(geo)
    packed = pack_weights(w, -1)
    prelu = dataclasses.replace(geo.attrs(-1, 0), activation="prelu")
    with pytest.raises(UserError, match="prelu needs 4 slopes, got 0"):
        binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, prelu)
    with pytest.raises(UserError, match="got 4 slopes with activation='relu'"):
        relu = dataclasses.replace(prelu, activation="relu")
        binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, relu, slope=np.ones(4, np.float32))
    with pytest.raises(UserError, match="residual shape \\(2, 4, 5, 4\\) is not the output's"):
        residual = np.zeros((2, 4, 5, 4), np.float32)
        binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, geo.attrs(-1, 0), residual=residual)
    residual = np.zeros((2, 4, 5, 5), np.float32)
    with pytest.raises(UserError, match="overlaps the residual"):
        binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, geo.attrs(-1, 0), residual=residual, out=residual)
    with pytest.raises(UserError, match="activation='gelu' is unsupported"):
        dataclasses.replace(prelu, activation="gelu")


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_kernel_per_channel_threshold_nan_and_no_bias(isa: str) -> None:
    geo = Geometry(19, 7, 6, 30)
    x, w, alpha, _ = make_inputs(geo, seed=3)
    x[0, 2, 1, :5] = np.nan
    threshold = np.linspace(-0.5, 0.5, 19).astype(np.float32)
    x[1, :, 0, 0] = threshold  # exactly on each channel's threshold
    for zero_sign in SIGNS:
        attrs = geo.attrs(zero_sign, pad_value=0)
        want_sums, want_out = binary_conv2d_ref(x, w, alpha, None, attrs, threshold=threshold)
        out, sums = binary_conv_cpu.binary_conv2d(
            x, pack_weights(w, zero_sign), alpha, None, attrs, threshold=threshold, isa=isa, return_sums=True
        )
        assert np.array_equal(sums, want_sums)
        assert_scaled_close(out, want_out)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("zero_sign", SIGNS)
def test_kernel_threads_and_layouts_do_not_change_results(isa: str, zero_sign: int) -> None:
    geo = Geometry(65, 40, 40, 41)  # enough work (> 2 * 2**20 word ops) for the kernel to start threads
    x, w, alpha, bias = make_inputs(geo)
    attrs = geo.attrs(zero_sign=zero_sign, pad_value=0)
    packed = pack_weights(w, zero_sign)
    one = binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, attrs, threads=1, isa=isa)
    many = binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, attrs, threads=3, isa=isa)
    strided = binary_conv_cpu.binary_conv2d(np.asfortranarray(x), packed, alpha, bias, attrs, threads=2, isa=isa)
    assert np.array_equal(one, many) and np.array_equal(one, strided)
    _, want = binary_conv2d_ref(x, w, alpha, bias, attrs)
    assert_scaled_close(one, want)


def _threaded_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, BinaryConvAttrs]:
    geo = Geometry(65, 40, 40, 41)  # > 2 * 2**20 word ops: the kernel runs shares on its pool threads
    x, w, alpha, bias = make_inputs(geo)
    return x, pack_weights(w, -1), alpha, bias, geo.attrs(zero_sign=-1, pad_value=0)


def test_kernel_calls_from_many_threads_at_once() -> None:
    """The worker pool serves one call at a time; calls that find it busy run alone, with the same result."""
    x, packed, alpha, bias, attrs = _threaded_case()
    want = binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, attrs, threads=1)

    def call(_: int) -> bool:
        return all(
            np.array_equal(binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, attrs, threads=2), want)
            for _ in range(10)
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # the kernel releases the GIL
        assert all(pool.map(call, range(8)))


def _kernel_in_child(queue: multiprocessing.Queue) -> None:
    x, packed, alpha, bias, attrs = _threaded_case()
    queue.put(binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, attrs, threads=2))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")
def test_kernel_runs_in_a_child_forked_after_the_pool_started() -> None:
    """A forked child has none of the parent's pool threads; it must start its own, not wait for them."""
    x, packed, alpha, bias, attrs = _threaded_case()
    want = binary_conv_cpu.binary_conv2d(x, packed, alpha, bias, attrs, threads=2)  # the parent's pool runs
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_kernel_in_child, args=(queue,))
    child.start()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
        if child.is_alive():  # pragma: no cover - only when the child hangs
            child.kill()
    assert child.exitcode == 0
    assert np.array_equal(got, want)


def test_kernel_isa_selection_and_bad_input() -> None:
    isas = binary_conv_cpu.supported_isas()
    assert isas[-1] == "scalar"
    with binary_conv_cpu.use_isa("scalar"):
        assert binary_conv_cpu.current_isa() == "scalar"
    assert binary_conv_cpu.current_isa() == isas[0]
    with pytest.raises(UserError, match="unknown ISA"):
        binary_conv_cpu.set_isa("sse9")
    geo = Geometry(17, 4, 5, 5)
    x, w, alpha, bias = make_inputs(geo)
    attrs = geo.attrs(-1, 0)
    with pytest.raises(UserError, match="not \\[N, 17, H, W\\]"):
        binary_conv_cpu.binary_conv2d(x[:, :16], pack_weights(w, -1), alpha, bias, attrs)
    with pytest.raises(UserError, match="W_packed shape"):
        binary_conv_cpu.binary_conv2d(x, pack_weights(w, -1)[..., :4], alpha, bias, attrs)


# --- the PyTorch module -------------------------------------------------------------------------


def _module(geo: Geometry, zero_sign: int, pad_value: int, alpha: str = "mean_abs", bias: bool = True) -> BinaryConv2d:
    pt, pl, pb, pr = geo.pads
    assert pt == pb and pl == pr
    module = BinaryConv2d(
        geo.c,
        geo.cout,
        geo.k,
        stride=geo.stride,
        padding=(pt, pl),
        dilation=geo.dilation,
        groups=geo.group,
        bias=bias,
        alpha=alpha,  # type: ignore[arg-type]
        pad_value=pad_value,
        zero_sign=zero_sign,
        threshold=geo.threshold,
    )
    _, w, _, b = make_inputs(geo)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(w))
        if module.bias is not None:
            module.bias.copy_(torch.from_numpy(b))
    return module.eval()


SYMMETRIC = [g for g in GEOMETRIES if g.pads[0] == g.pads[2] and g.pads[1] == g.pads[3]]


@pytest.mark.parametrize("geo", SYMMETRIC, ids=lambda g: f"c{g.c}o{g.cout}k{g.k}s{g.stride}d{g.dilation}g{g.group}")
def test_module_matches_reference(geo: Geometry) -> None:
    x, w, _, bias = make_inputs(geo)
    for zero_sign, pad_value in itertools.product(SIGNS, SIGNS):
        attrs = geo.attrs(zero_sign, pad_value)
        # learned alpha of ones and no bias: the module's output *is* the integer sum
        counter = _module(geo, zero_sign, pad_value, alpha="learned", bias=False)
        with torch.no_grad():
            counter.alpha.fill_(1.0)
            sums = counter(torch.from_numpy(x)).numpy()
        want_sums, _ = binary_conv2d_ref(x, w, np.ones(geo.cout, np.float32), None, attrs)
        assert np.array_equal(sums, want_sums.astype(np.float32))
        module = _module(geo, zero_sign, pad_value)
        with torch.no_grad():
            out = module(torch.from_numpy(x)).numpy()
        alpha = np.abs(w).mean(axis=(1, 2, 3)).astype(np.float32)
        np.testing.assert_allclose(alpha, module.scale().numpy(), rtol=1e-6)
        _, want_out = binary_conv2d_ref(x, w, module.scale().numpy(), bias, attrs)
        assert_scaled_close(out, want_out)


def test_module_learned_threshold_is_a_per_channel_threshold() -> None:
    module = BinaryConv2d(8, 4, 3, padding=1, threshold="learned", zero_sign=0).eval()
    threshold = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, -1.0])
    with torch.no_grad():
        module.threshold.copy_(threshold)
    x = torch.randint(-4, 5, (2, 8, 5, 5)).float() * 0.25
    with torch.no_grad():
        out = module(x).numpy()
    weight, alpha = module.weight.detach().numpy(), module.scale().numpy()
    _, want = binary_conv2d_ref(x.numpy(), weight, alpha, None, module.op_attrs(), threshold=threshold.numpy())
    assert_scaled_close(out, want)
    assert set(module.state_dict()) == {"weight", "threshold"}


def test_state_dict_keys_follow_the_options() -> None:
    assert set(BinaryConv2d(4, 4, 3).state_dict()) == {"weight"}
    assert set(BinaryConv2d(4, 4, 3, alpha="learned", bias=True).state_dict()) == {"weight", "alpha", "bias"}
    with pytest.raises(UserError, match="pad_value=2"):
        BinaryConv2d(4, 4, 3, pad_value=2)
    with pytest.raises(UserError, match="alpha="):
        BinaryConv2d(4, 4, 3, alpha="max")  # type: ignore[arg-type]


# --- gradients (straight-through estimators) ----------------------------------------------------


def test_activation_ste_gradients_are_as_documented() -> None:
    values = [-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5]
    x = torch.tensor(values, requires_grad=True)
    sign_ste(x, 0.0, -1, "approx").sum().backward()
    expected_approx = [max(0.0, 2 - 2 * abs(v)) for v in values]  # Bi-Real ApproxSign
    assert torch.allclose(x.grad, torch.tensor(expected_approx))
    x.grad = None
    out = sign_ste(x, 0.0, 0, "clip")
    assert out.tolist() == [-1, -1, -1, 0, 1, 1, 1]
    out.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]  # hard-tanh: 1 where |x| <= 1


def test_rsign_threshold_gradient_is_minus_the_input_gradient() -> None:
    layer = RSign(3, ste="clip")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(layer.threshold.grad, -x.grad.sum(dim=(0, 2, 3)))


def test_weight_ste_and_detached_mean_abs_alpha() -> None:
    torch.manual_seed(0)
    module = BinaryConv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        module.weight.mul_(8.0)  # some latent weights beyond +-1
    x = torch.randn(2, 6, 5, 5)
    grad_out = torch.randn(2, 5, 5, 5)
    module(x).backward(grad_out)
    xb = F.pad(sign_ste(x, 0.0, -1), (1, 1, 1, 1), value=0.0)
    wb = torch.sign(module.weight.detach()).requires_grad_()
    (F.conv2d(xb, wb) * module.scale().view(1, -1, 1, 1)).backward(grad_out)
    mask = (module.weight.detach().abs() <= 1).float()
    assert (mask == 0).any() and (mask == 1).any()
    assert torch.allclose(module.weight.grad, wb.grad * mask, atol=1e-6)


def test_learned_alpha_and_rprelu_train() -> None:
    module = BinaryConv2d(4, 3, 3, padding=1, alpha="learned", bias=True)
    act = RPReLU(3)
    out = act(module(torch.randn(2, 4, 6, 6)))
    out.square().mean().backward()
    for param in (module.alpha, module.bias, module.weight, act.shift_in, act.weight, act.shift_out):
        assert param.grad is not None and torch.isfinite(param.grad).all()
