"""Run ``tod::BinaryConv2d`` nodes inside one onnxruntime (CPU) InferenceSession on the compiled kernel.

For a user's own session (:func:`session_options`, :class:`BinaryConvSession`). tod-deploy itself runs
such models through ``ops.ort_segments``, which avoids this hook's copies (see there).

onnxruntime-extensions' Python custom-op hook (``onnx_op``) accepts a domain in the op type
(``"tod::BinaryConv2d"``), so the node runs under its own domain. Limits of that hook, which
shape the op's ONNX form (see ``binary_conv_ref``): attributes are scalar int/float/string only
(lists travel as "3,3" strings), every declared input is required (``bias`` is always written, an
absent residual or slope is an empty tensor), and one signature per op type: a version-1 file is
read as version 2 first (``binary_conv_versions.upgrade_to_v2``, in memory).

Errors: an exception escaping a Python op makes onnxruntime-extensions call std::terminate
(the process aborts). Our hook catches it, prints it, returns an empty output (so onnxruntime
fails on it or the caller sees an empty result) and keeps it; a :class:`BinaryConvSession` then
raises it as a :class:`UserError`.

Speed: the stock hook hands each output back to C++ as ``ndarray.tolist()``, which costs
~175 ms for one 64x200x200 feature map, more than the convolution. :func:`register` therefore
chains a hook in front of the stock one that returns the array itself for our op (the C++
side accepts any buffer: ~1 ms); every other Python op still goes through the stock path.
Per call, what is ours to save is saved: the attributes are parsed once per node (cached by
their values), and the output is written into one array per thread and shape that the hook
reuses (the C++ side copies it into onnxruntime's tensor before that thread calls again), so
a large map costs no fresh pages each call. What remains is the extension's own copy of each
input and of the output (its C++ code, not ours).
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from tod_deploy.errors import UserError
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.ops.binary_conv_ref import DOMAIN, LIST_ATTRS, OP_TYPE, BinaryConvAttrs, is_binary_conv

_lock = threading.Lock()
_fast_ids: set[int] = set()
_registered = False
_hooked = False
_errors: list[BaseException] = []
_outputs = threading.local()  # per thread: output shape -> the array the hook reuses


@functools.lru_cache(maxsize=4096)
def _parsed(items: tuple[tuple[str, Any], ...]) -> BinaryConvAttrs:
    return BinaryConvAttrs.from_onnx(dict(items))


def _output_buffer(shape: tuple[int, ...]) -> np.ndarray:
    buffers = _outputs.__dict__.setdefault("by_shape", {})
    if shape not in buffers:
        buffers[shape] = np.empty(shape, dtype=np.float32)
    return buffers[shape]


def _binary_conv2d(
    x: np.ndarray,
    w_packed: np.ndarray,
    alpha: np.ndarray,
    bias: np.ndarray,
    residual: np.ndarray,
    slope: np.ndarray,
    **attrs: Any,
) -> np.ndarray:
    parsed = _parsed(tuple(sorted(attrs.items())))
    shape = (x.shape[0], w_packed.shape[0], *parsed.output_size(*x.shape[2:])) if x.ndim == 4 else None
    out = _output_buffer(shape) if shape is not None and min(shape) > 0 else None
    return binary_conv_cpu.binary_conv2d(x, w_packed, alpha, bias, parsed, residual=residual, slope=slope, out=out)


def _install_array_hook() -> None:
    """Return our op's output as an array instead of a list (see module docstring)."""
    global _hooked
    from onnxruntime_extensions import PyCustomOpDef, _ocos

    stock = getattr(_ocos, "_on_pyop_invocation", None)
    if stock is None:  # another onnxruntime-extensions layout: keep the stock (slow but correct) path
        return

    def hook(op_id: int, feed: Any, attributes: Any) -> Any:
        if op_id not in _fast_ids:
            return stock(op_id, feed, attributes)
        op = _ocos.Opdef._odlist[op_id]
        try:
            out = np.ascontiguousarray(op.body(*feed, **op.cast_attributes(attributes)), dtype=np.float32)
        except Exception as exc:  # anything escaping here aborts the process
            print(f"error: tod::{OP_TYPE} failed in onnxruntime: {exc}", file=sys.stderr)
            _errors.append(exc)
            out = np.zeros((0,), dtype=np.float32)
        return (op_id, out.shape, out.reshape(-1))

    PyCustomOpDef.install_hooker(hook)
    _hooked = True


def array_hook_installed() -> bool:
    """Whether our hook (fast outputs, errors caught) is in front of the stock one."""
    return _hooked


def register() -> None:
    """Declare ``tod::BinaryConv2d`` to onnxruntime-extensions (once per process)."""
    global _registered
    with _lock:
        if _registered:
            return
        from onnxruntime_extensions import PyCustomOpDef, onnx_op

        attrs = {name: PyCustomOpDef.dt_string for name in LIST_ATTRS}
        attrs.update(
            group=PyCustomOpDef.dt_int64,
            in_channels=PyCustomOpDef.dt_int64,
            threshold=PyCustomOpDef.dt_float,
            zero_sign=PyCustomOpDef.dt_int64,
            pad_value=PyCustomOpDef.dt_int64,
            activation=PyCustomOpDef.dt_string,
        )
        floats = [PyCustomOpDef.dt_float] * 4  # alpha, bias, residual, slope
        opdef = onnx_op(
            op_type=f"{DOMAIN}::{OP_TYPE}",
            inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, *floats],
            outputs=[PyCustomOpDef.dt_float],
            attrs=attrs,
        )(_binary_conv2d)
        _fast_ids.add(id(opdef))
        _install_array_hook()
        _registered = True


def session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """SessionOptions (new, or the given ones) with the extensions library and our op registered.

    Spinning is off: it stops onnxruntime's idle intra-op threads from busy-waiting after
    each of its ops: the kernel of a ``tod`` node runs its own threads right after, and on a
    2-core machine the spinning threads took its cores (measured: the kernel ran ~2x slower).
    """
    from onnxruntime_extensions import get_library_path

    register()
    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def uses_binary_conv(model: onnx.ModelProto) -> bool:
    return any(is_binary_conv(node) for node in model.graph.node)


class BinaryConvSession(ort.InferenceSession):
    """An InferenceSession that raises a failed ``tod::BinaryConv2d`` as a UserError."""

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        _errors.clear()
        try:
            result = super().run(output_names, input_feed, run_options)
        except Exception as exc:
            if _errors:
                raise _as_user_error(_errors[0]) from exc
            raise
        if _errors:
            raise _as_user_error(_errors[0])
        return result


def _as_user_error(exc: BaseException) -> UserError:
    if isinstance(exc, UserError):
        return exc
    return UserError(f"tod::{OP_TYPE} failed in onnxruntime: {exc}", "check the node's inputs against its attributes")
