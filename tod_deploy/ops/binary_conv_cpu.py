"""The compiled CPU kernel of ``tod::BinaryConv2d`` (``plugins/binary_conv2d/cpu``), from Python.

Why a wrapper: the extension only checks buffer sizes; input mistakes are reported here as
:class:`UserError` with the fix, and outputs are allocated here so that the C++ side needs no
NumPy headers. The ISA path is chosen per call (``isa=``), per block (:func:`use_isa`) or for
the process (:func:`set_isa`); by default the best one this CPU supports runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from tod_deploy.errors import UserError
from tod_deploy.ops.binary_conv_ref import ACTIVATIONS, BinaryConvAttrs

try:
    from tod_deploy.ops import _binary_conv_cpu as _ext
except ImportError as exc:  # pragma: no cover - only without a build
    _ext = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

ISAS = ("amx", "avx512", "avx2", "scalar")
_selected: str | None = None


def _module():  # noqa: ANN202 - the extension module has no stub
    if _ext is None:
        raise UserError(
            f"the compiled tod::BinaryConv2d kernel is not built ({_IMPORT_ERROR})",
            "reinstall tod-deploy: pip install -e .",
        )
    return _ext


def available() -> bool:
    return _ext is not None


def supported_isas() -> tuple[str, ...]:
    """ISA paths this build and this CPU can run, best first (``scalar`` is always there)."""
    return tuple(_module().supported_isas())


def set_isa(name: str | None) -> None:
    """Force one ISA path for the whole process; ``None`` or ``"auto"`` goes back to the best."""
    global _selected
    _selected = None if name in (None, "auto") else _check_isa(name)


@contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the block on one ISA path (tests and benchmarks)."""
    global _selected
    previous = _selected
    set_isa(name)
    try:
        yield
    finally:
        _selected = previous


def current_isa() -> str:
    return _selected or supported_isas()[0]


def _check_isa(name: str) -> str:
    if name not in ISAS:
        raise UserError(f"unknown ISA path {name!r}", f"use one of {', '.join(ISAS)} or auto")
    if name not in supported_isas():
        raise UserError(f"this CPU cannot run the {name} path", f"use one of {', '.join(supported_isas())}")
    return name


def default_threads() -> int:
    """The cores this process may run on (taskset/cgroup aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def binary_conv2d(
    x: np.ndarray,
    w_packed: np.ndarray,
    alpha: np.ndarray,
    bias: np.ndarray | None,
    attrs: BinaryConvAttrs,
    *,
    threshold: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    slope: np.ndarray | None = None,
    isa: str | None = None,
    threads: int | None = None,
    return_sums: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Run the op; returns Y float32 ``[N, Cout, Ho, Wo]`` (and S int32 with ``return_sums``).

    ``threshold`` is an optional per-input-channel threshold overriding ``attrs.threshold``.
    ``residual`` (Y's shape) and ``slope`` (``Cout`` values, for ``attrs.activation == "prelu"``) are the
    fused epilogue's inputs; an empty array means none, as in the ONNX form.
    ``out``: write Y into this C-contiguous float32 array (the onnxruntime hook reuses one per shape:
    a fresh 10 MB array costs its page faults on every call).
    """
    ext = _module()
    x = np.ascontiguousarray(x, dtype=np.float32)
    w_packed = np.ascontiguousarray(w_packed, dtype=np.uint8)
    alpha = np.ascontiguousarray(alpha, dtype=np.float32).reshape(-1)
    if x.ndim != 4 or x.shape[1] != attrs.in_channels:
        raise UserError(f"BinaryConv2d input shape {x.shape} is not [N, {attrs.in_channels}, H, W]", "fix the input")
    cout = w_packed.shape[0] if w_packed.ndim == 4 else -1
    if w_packed.shape != attrs.packed_shape(max(cout, 0)) or cout < 1 or cout % attrs.group:
        raise UserError(
            f"BinaryConv2d W_packed shape {w_packed.shape} does not match the attributes (expected "
            f"[Cout, {attrs.kernel_shape[0]}, {attrs.kernel_shape[1]}, {attrs.words * 8}] with Cout % group == 0)",
            "pack the weights with tod_deploy.ops.binary_conv_ref.pack_weights",
        )
    if alpha.shape != (cout,) or (bias is not None and np.asarray(bias).size != cout):
        raise UserError(f"BinaryConv2d alpha/bias must have {cout} values", "give one per output channel")
    if bias is not None:
        bias = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
    thr = np.full(attrs.in_channels, attrs.threshold, dtype=np.float32)
    if threshold is not None:
        thr = np.ascontiguousarray(np.broadcast_to(np.asarray(threshold, dtype=np.float32).reshape(-1), thr.shape))
    n, c, h, w = x.shape
    ho, wo = attrs.output_size(h, w)
    residual, slope = _epilogue_inputs(attrs, (n, cout, ho, wo), residual, slope)
    if out is None:
        out = np.empty((n, cout, ho, wo), dtype=np.float32)
    elif out.shape != (n, cout, ho, wo) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise UserError(f"BinaryConv2d out= must be float32 C-contiguous {(n, cout, ho, wo)}", "pass such an array")
    elif residual is not None and np.shares_memory(out, residual):
        raise UserError("BinaryConv2d out= overlaps the residual", "pass a separate output array")
    sums = np.empty((n, cout, ho, wo), dtype=np.int32) if return_sums else None
    (kh, kw), (sh, sw), (dh, dw) = attrs.kernel_shape, attrs.strides, attrs.dilations
    geometry = (n, c, h, w, cout, kh, kw, sh, sw, dh, dw, *attrs.pads, attrs.group, attrs.zero_sign, attrs.pad_value)
    path = _check_isa(isa) if isa is not None else current_isa()
    ext.conv2d(
        x, w_packed, alpha, bias, thr, out, sums, geometry, path, int(threads or default_threads()),
        residual, slope, ACTIVATIONS.index(attrs.activation),
    )  # fmt: skip
    return (out, sums) if return_sums else out


def _epilogue_inputs(
    attrs: BinaryConvAttrs, out_shape: tuple[int, ...], residual: np.ndarray | None, slope: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The residual and slope as the kernel reads them (None when absent), or a UserError naming the mismatch."""
    if residual is not None and np.size(residual) == 0:
        residual = None
    if residual is not None:
        residual = np.ascontiguousarray(residual, dtype=np.float32)
        if residual.shape != out_shape:
            raise UserError(
                f"BinaryConv2d residual shape {residual.shape} is not the output's {out_shape}",
                "give a residual of the output's shape, or an empty one for none",
            )
    cout = out_shape[1]
    given = 0 if slope is None else int(np.size(slope))
    if attrs.activation == "prelu":
        if given != cout:
            raise UserError(f"BinaryConv2d prelu needs {cout} slopes, got {given}", "give one per output channel")
        return residual, np.ascontiguousarray(slope, dtype=np.float32).reshape(-1)
    if given:
        raise UserError(
            f"BinaryConv2d got {given} slopes with activation={attrs.activation!r}", "give slopes only for prelu"
        )
    return residual, None
