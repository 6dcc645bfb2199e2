"""``tod::BinaryConv2d`` as a Python-defined TensorRT 11 plugin with an ahead-of-time (AOT) kernel.

The AOT form puts the kernel's PTX, its launch geometry and its integer arguments into the engine,
so the engine runs without Python and without a plugin library
(https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/index.html).

The shape, dtype and argument logic are plain functions, generic over Python ints and TensorRT's
symbolic shape expressions (only +, -, * and a passed-in ``cdiv``), so the tests check them against
the NumPy reference here, where TensorRT cannot be installed; the decorated functions only call them.

No ``from __future__ import annotations`` in this module: ``tensorrt.plugin`` reads the decorated
functions' annotations as objects (``trtp.TensorDesc``, ``int``, ``str``), not as strings.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import onnx
from onnx import numpy_helper

from tod_deploy.errors import UserError
from tod_deploy.ops.binary_conv_ref import DOMAIN, OP_TYPE, BinaryConvAttrs, is_binary_conv
from tod_deploy.ops.binary_conv_versions import upgrade_to_v2
from tod_deploy.trt import kernels
from tod_deploy.trt.runtime import require_cuda, require_tensorrt

PLUGIN_ID = f"{DOMAIN}::{OP_TYPE}"
KNOWN_PLUGINS = frozenset({PLUGIN_ID})
# The ONNX parser finds a plugin by op type == plugin name and a string attribute naming its
# namespace (onnx-tensorrt FallbackPluginImporter; newer parsers also try the node's domain), and
# an int attribute ``aot`` = 1 asks for the AOT implementation strictly (importerUtils createPlugin).
NAMESPACE_ATTR = "plugin_namespace"
AOT_ATTR = "aot"
INPUT_NAMES = kernels.KERNEL_INPUTS  # x, w_packed, alpha, bias, residual, slope (op version 2)
REEXPORT_FIX = "re-export the model with tod-deploy export"

T = TypeVar("T")
Cdiv = Callable[[Any, Any], Any]


def attrs_from_fields(fields: Mapping[str, object]) -> BinaryConvAttrs:
    """The plugin's attributes (the ONNX node's, as TensorRT hands them over) -> validated attrs.

    onnx-tensorrt passes a STRING attribute as a kCHAR field whose length counts a terminating NUL,
    and tensorrt.plugin decodes all of its bytes, so "3,3" arrives as "3,3\\0": strip it.
    """
    cleaned = {k: v.rstrip("\0") if isinstance(v, str) else v for k, v in fields.items()}
    return BinaryConvAttrs.from_onnx(cleaned)


def _attrs(
    kernel_shape: str, strides: str, pads: str, dilations: str, group: int, in_channels: int, threshold: float,
    zero_sign: int, pad_value: int, activation: str,
) -> BinaryConvAttrs:  # fmt: skip
    return attrs_from_fields(
        {"kernel_shape": kernel_shape, "strides": strides, "pads": pads, "dilations": dilations, "group": group,
         "in_channels": in_channels, "threshold": threshold, "zero_sign": zero_sign, "pad_value": pad_value,
         "activation": activation}
    )  # fmt: skip


def output_shape(x_shape: Sequence[T], w_shape: Sequence[T], attrs: BinaryConvAttrs, cdiv: Cdiv) -> tuple[T, ...]:
    """[N, C, H, W] and W_packed [Cout, KH, KW, bytes] -> Y [N, Cout, OH, OW]."""
    n, _c, h, w = x_shape
    oh, ow = kernels.output_hw(h, w, attrs, cdiv)
    return (n, w_shape[0], oh, ow)


def output_dtype(input_dtypes: Sequence[T], *, float32: T, packed: T) -> T:
    """Y is float32, as in the reference; the inputs (in ``INPUT_NAMES`` order) must be what the kernel reads.

    ``packed`` is the dtype W_packed has in the network TensorRT sees (int32, see tensorrt_view); every
    other input is float32, the empty residual and slope that stand for "none" too.
    """
    if len(input_dtypes) != len(INPUT_NAMES):
        raise UserError(
            f"{PLUGIN_ID} has {len(input_dtypes)} inputs; the kernel reads {', '.join(INPUT_NAMES)}",
            REEXPORT_FIX,
        )
    wanted = (float32, packed, *(float32,) * (len(INPUT_NAMES) - 2))
    for name, got, want in zip(INPUT_NAMES, input_dtypes, wanted, strict=True):
        if got != want:
            raise UserError(
                f"{PLUGIN_ID} input {name} is {got}, the kernel reads {want}",
                "build with tod-deploy build-engine from an export whose 1-bit layers take float32 activations",
            )
    return float32


def has_residual(residual_shape: Sequence[int | None], y_shape: Sequence[int | None]) -> bool:
    """Whether the residual input is a residual: of Y's shape ``[N, Cout, OH, OW]`` (True) or the empty ``[0]``
    that stands for none (False). Dims are ints, or None where not known at build time."""
    if len(residual_shape) == 1 and residual_shape[0] in (0, None):
        return False
    if len(residual_shape) == len(y_shape) == 4 and all(map(_agree, residual_shape, y_shape)):
        return True
    shown = ", ".join("?" if d is None else str(d) for d in y_shape)
    raise UserError(
        f"{PLUGIN_ID} input residual has shape {list(residual_shape)}; it must be Y's [{shown}] or the empty [0] "
        "for none",
        REEXPORT_FIX,
    )


def check_slope(slope_shape: Sequence[int | None], out_channels: int | None, attrs: BinaryConvAttrs) -> None:
    """``slope`` holds one value per output channel exactly when the activation is prelu, else it is empty."""
    want = out_channels if attrs.activation == "prelu" else 0
    if len(slope_shape) == 1 and _agree(slope_shape[0], want):
        return
    raise UserError(
        f"{PLUGIN_ID} input slope has shape {list(slope_shape)}; with activation {attrs.activation!r} it must be "
        f"[{want if want is not None else 'Cout'}]",
        REEXPORT_FIX,
    )


def _agree(dim: int | None, want: int | None) -> bool:
    """Two dims agree unless both are known and differ."""
    return dim is None or want is None or dim == want


def kernel_args(
    x_shape: Sequence[Any], out_channels: int, attrs: BinaryConvAttrs, cdiv: Cdiv, *, has_residual: bool
) -> list[Any]:
    """The int32 extra kernel arguments, in ``kernels.KERNEL_INT_ARGS`` order."""
    return list(kernels.kernel_int_args(tuple(x_shape), out_channels, attrs, cdiv, has_residual=has_residual))


def launch(x_shape: Sequence[Any], out_channels: int, attrs: BinaryConvAttrs, cdiv: Cdiv) -> kernels.Launch:
    """Grid, block and shared memory of one launch."""
    return kernels.launch_geometry(tuple(x_shape), out_channels, attrs, cdiv)


def pick_arch(compute_capability: tuple[int, int]) -> str:
    """The newest PTX target the device can JIT: PTX for sm_XY runs on every device >= X.Y."""
    have = compute_capability[0] * 10 + compute_capability[1]
    usable = [arch for arch in kernels.TARGET_ARCHS if int(arch.removeprefix("sm_")) <= have]
    if not usable:
        raise UserError(
            f"this GPU (compute capability {compute_capability[0]}.{compute_capability[1]}) is older than "
            f"the {PLUGIN_ID} kernel's targets ({', '.join(kernels.TARGET_ARCHS)})",
            "use a Turing (sm_75) or newer GPU, or export with --binary-conv decompose",
        )
    return max(usable, key=lambda arch: int(arch.removeprefix("sm_")))


@functools.cache
def ptx_for(arch: str) -> str:
    """nvcc once per arch and process: the builder asks for every plugin layer."""
    return kernels.compile_ptx(arch)


def device_ptx() -> str:
    """PTX for the GPU the engine is being built on."""
    return ptx_for(pick_arch(require_cuda().compute_capability()))


def tensorrt_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an export, shaped for TensorRT's ONNX parser; the file on disk is left as is.

    - version-1 nodes (four inputs, no ``activation``) become version 2 first (``upgrade_to_v2``: the
      empty residual and slope, ``activation="none"``): the plugin has the one six-input signature;
    - each ``tod`` node gets ``plugin_namespace="tod"`` (how the parser finds our plugin) and ``aot=1``,
      and its ten attributes rewritten in full and canonical form: TensorRT's Python plugin layer
      passes attributes to ``aot_impl`` positionally in the order the parser hands them over, so a
      node must carry every one of them (older exports may omit defaults);
    - W_packed is reinterpreted from uint8 [Cout, KH, KW, B] to int32 [Cout, KH, KW, B/4] (the same
      little-endian bytes; B is a multiple of 8): TensorRT takes uint8 only as a network input or
      output to cast to float, not as a plugin input
      (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/FoundationalTypes/DataType.html).
    """
    view = onnx.ModelProto()
    view.CopyFrom(upgrade_to_v2(model))
    packed = {node.input[1] for node in view.graph.node if is_binary_conv(node)}
    for node in view.graph.node:
        if is_binary_conv(node):
            attrs = BinaryConvAttrs.from_onnx({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
            del node.attribute[:]
            for name, value in {**attrs.to_onnx(), NAMESPACE_ATTR: DOMAIN, AOT_ATTR: 1}.items():
                node.attribute.append(onnx.helper.make_attribute(name, value))
    for index, init in enumerate(view.graph.initializer):
        if init.name in packed and init.data_type == onnx.TensorProto.UINT8:
            words = numpy_helper.to_array(init).view("<i4")
            view.graph.initializer[index].CopyFrom(numpy_helper.from_array(words, init.name))
    for info in [v for v in view.graph.value_info if v.name in packed]:  # stale uint8 type annotations
        view.graph.value_info.remove(info)
    missing = packed - {init.name for init in view.graph.initializer}
    if missing:
        raise UserError(
            f"{PLUGIN_ID} weights {sorted(missing)[0]!r} are computed in the graph, not stored",
            "re-export with tod-deploy export, which stores W_packed as an initializer",
        )
    return view


def register_plugins() -> None:
    """Register ``tod::BinaryConv2d`` with TensorRT once per process; needed before parsing an ONNX with
    ``tod`` nodes, not to deserialize an engine (an AOT plugin's kernel lives in the engine)."""
    _register()


@functools.cache
def _register() -> None:
    trt = require_tensorrt()
    try:
        import tensorrt.plugin as trtp  # noqa: PLC0415 - only with TensorRT present
    except Exception as exc:  # noqa: BLE001 - any failure of TensorRT's own module is one line
        raise _refused(trt, f"import tensorrt.plugin failed ({exc})") from exc
    if not hasattr(trtp, "KernelLaunchParams"):
        raise _refused(trt, "this TensorRT has no ahead-of-time Python plugins")
    try:
        _define(trt, trtp)
    except ValueError as exc:  # tensorrt.plugin's signature checks (_validate.py) raise ValueError
        raise _refused(trt, str(exc)) from exc


def _refused(trt: Any, why: str) -> UserError:
    return UserError(
        f"TensorRT {getattr(trt, '__version__', '?')} refused the {PLUGIN_ID} plugin: {why}",
        "use TensorRT 11 (pip install 'tod-deploy[gpu]'), or export with --binary-conv decompose",
    )


def _define(trt: Any, trtp: Any) -> None:
    """The two decorated functions; tensorrt.plugin validates their signatures as they are defined.

    ``aot_impl`` must take every registered attribute in registration order, then ``outputs`` and
    ``tactic``, and carry its documented return annotation; TensorRT calls it with the attributes
    positionally, in the order the ONNX parser handed them over (the registration order).
    """

    def cdiv(a: Any, b: Any) -> Any:
        # trtp.cdiv refuses two ints (see tensorrt.plugin Functions); constant attrs are ints.
        if isinstance(a, int) and isinstance(b, int):
            return -(-a // b)
        return trtp.cdiv(a, b)

    def known(dims: Sequence[Any]) -> list[int | None]:
        """Dims as ints where known at build time, None elsewhere (and in the dtype pass, where
        tensorrt.plugin hands over fake shape expressions that only carry the rank)."""
        return [e if isinstance(e, int) else None if e.is_fake or not e.is_constant else e.constant_value()
                for e in dims]  # fmt: skip

    @trtp.register(PLUGIN_ID)
    def _describe(
        x: trtp.TensorDesc,
        w_packed: trtp.TensorDesc,
        alpha: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        residual: trtp.TensorDesc,
        slope: trtp.TensorDesc,
        kernel_shape: str,
        strides: str,
        pads: str,
        dilations: str,
        group: int,
        in_channels: int,
        threshold: float,
        zero_sign: int,
        pad_value: int,
        activation: str,
    ) -> trtp.TensorDesc:
        attrs = _attrs(kernel_shape, strides, pads, dilations, group, in_channels, threshold, zero_sign, pad_value,
                       activation)  # fmt: skip
        inputs = (x, w_packed, alpha, bias, residual, slope)
        dtype = output_dtype([d.dtype for d in inputs], float32=trt.float32, packed=trt.int32)
        shape = output_shape(list(x.shape_expr), list(w_packed.shape_expr), attrs, cdiv)
        has_residual(known(residual.shape_expr), known(shape))
        check_slope(known(slope.shape_expr), known(shape)[1], attrs)
        return trtp.from_shape_expr(tuple(shape), dtype=dtype)

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(
        x: trtp.TensorDesc,
        w_packed: trtp.TensorDesc,
        alpha: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        residual: trtp.TensorDesc,
        slope: trtp.TensorDesc,
        kernel_shape: str,
        strides: str,
        pads: str,
        dilations: str,
        group: int,
        in_channels: int,
        threshold: float,
        zero_sign: int,
        pad_value: int,
        activation: str,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        attrs = _attrs(kernel_shape, strides, pads, dilations, group, in_channels, threshold, zero_sign, pad_value,
                       activation)  # fmt: skip
        x_shape = list(x.shape_expr)
        out_channels = w_packed.shape_expr[0].constant_value()  # W_packed is an initializer: static
        geometry = launch(x_shape, out_channels, attrs, cdiv)
        params = trtp.KernelLaunchParams(
            grid_x=geometry.grid[0], grid_y=geometry.grid[1], grid_z=geometry.grid[2],
            block_x=geometry.block[0], block_y=geometry.block[1], block_z=geometry.block[2],
            shared_mem=geometry.shared_mem,
        )  # fmt: skip
        y_shape = output_shape(x_shape, list(w_packed.shape_expr), attrs, cdiv)
        residual_given = has_residual(known(residual.shape_expr), known(y_shape))
        values = kernel_args(x_shape, out_channels, attrs, cdiv, has_residual=residual_given)
        extra = trtp.SymIntExprs(len(values))
        for index, value in enumerate(values):
            extra[index] = trtp.SymInt32(value)
        return kernels.KERNEL_NAME, device_ptx(), params, extra
