"""TensorRT's real Python layer, run here over the smallest stand-in for its compiled core.

The ``tensorrt-cu13-bindings`` wheel holds TensorRT's Python code (``tensorrt_bindings/__init__.py``
and the ``plugin/`` subpackage: ``register``, ``aot_impl``, the signature checks of ``_validate.py``,
the plugin creator of ``_lib.py`` and the AOT plugin class of ``_plugin_class.py``) and one compiled
module, ``tensorrt_bindings/tensorrt.*.so``, that needs libnvinfer, which no package index here has.

``load_python_layer`` downloads that wheel once (pinned below), unpacks its ``.py`` files unchanged,
puts :class:`CompiledCoreStandIn`'s names in place of the compiled module, and builds the ``tensorrt``
package the way the ``tensorrt-cu13`` meta package does (``from tensorrt_bindings import *``), so
``import tensorrt.plugin`` runs NVIDIA's code. Only the compiled core is replaced; every name it
provides below says which file of the wheel touches it. What TensorRT's C++ side does with a plugin
(its ONNX importer, its builder's calls) is in ``tensorrt_importer.py``.
"""

from __future__ import annotations

import enum
import os
import re
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The wheel the tests run against; bump it here (or set TOD_TENSORRT_BINDINGS for one run).
BINDINGS_WHEEL = os.environ.get("TOD_TENSORRT_BINDINGS", "tensorrt-cu13-bindings==11.4.0.106")
PACKAGE = "tensorrt_bindings"
CORE_MODULE = f"{PACKAGE}.tensorrt"  # the compiled module the stand-in replaces
COMPILED_CORE = "compiled-core.so"  # where the real one is put, outside the package, to be read as bytes


# NVIDIA's modules have docstrings with invalid escape sequences; Python warns as it compiles them.
IGNORE_WHEEL_WARNINGS = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")


class WheelUnavailable(RuntimeError):
    """The pinned wheel could not be downloaded (no package index reachable)."""


def python_layer_dir(cache: Path) -> Path:
    """Download the pinned wheel into ``cache`` once and unpack its Python files (not the .so)."""
    name, _, version = BINDINGS_WHEEL.partition("==")
    target = cache / f"{name}-{version}"
    if (target / PACKAGE / "plugin" / "_lib.py").is_file() and (target / COMPILED_CORE).is_file():
        return target
    wheels = cache / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
           "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp", "-d", str(wheels),
           BINDINGS_WHEEL]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not found:
        raise WheelUnavailable(f"pip could not download {BINDINGS_WHEEL}: {result.stderr.strip()[-300:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        for member in wheel.namelist():
            if member.startswith(f"{PACKAGE}/") and member.endswith(".py"):
                wheel.extract(member, target)
            elif member.startswith(f"{PACKAGE}/tensorrt") and ".so" in member:  # kept aside, never imported
                (target / COMPILED_CORE).write_bytes(wheel.read(member))
    return target


def python_layer_dir_or_skip() -> Path:
    """The unpacked wheel (cached in $TOD_TEST_CACHE or ~/.cache/tod-deploy-tests); in CI a failed
    download fails the run, elsewhere the test skips with the reason."""
    cache = Path(os.environ.get("TOD_TEST_CACHE", Path.home() / ".cache" / "tod-deploy-tests"))
    try:
        return python_layer_dir(cache)
    except WheelUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


def compiled_core_strings(layer: Path) -> set[str]:
    """Every printable string of the compiled core: the binding's names and docstrings (``strings``)."""
    data = (layer / COMPILED_CORE).read_bytes()
    return {m.decode() for m in re.findall(rb"[\x20-\x7e\t]{4,}", data)}


# ---------------------------------------------------------------------------------------------
# The stand-in for tensorrt_bindings/tensorrt.so: enums, base classes and small value types.
# ---------------------------------------------------------------------------------------------


class DataType(enum.Enum):
    """__init__.py (nptype, itemsize), plugin/_utils.py (_str_to_data_type), plugin/_tensor.py."""

    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


class DimensionOperation(enum.Enum):
    """plugin/_tensor.py (SymIntExpr operators), plugin/_top_level.py (cdiv, max, min)."""

    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


class PluginFieldType(enum.Enum):
    """plugin/_utils.py and _lib.py (field types of attributes), the importer's field types."""

    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11


# How the binding's PluginField.data getter views a field's bytes, by type (TensorRT's python/
# bindings pyPlugin.cpp: py::array(length, static_cast<T const*>(data)); char is int8 there).
FIELD_DTYPES = {
    PluginFieldType.INT8: np.int8,
    PluginFieldType.INT16: np.int16,
    PluginFieldType.INT32: np.int32,
    PluginFieldType.INT64: np.int64,
    PluginFieldType.FLOAT32: np.float32,
    PluginFieldType.FLOAT64: np.float64,
    PluginFieldType.CHAR: np.int8,
}


class TensorFormat(enum.Enum):
    """plugin/_plugin_class.py (default LINEAR format), plugin/_autotune.py."""

    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5


class TensorRTPhase(enum.Enum):
    """plugin/_lib.py: create_plugin(..., TensorRTPhase.BUILD)."""

    BUILD = 0
    RUNTIME = 1


class QuickPluginCreationRequest(enum.Enum):
    """plugin/_export.py (its presence enables AOT plugins) and _lib.py (create_plugin's choice)."""

    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class PluginArgType(enum.Enum):
    """plugin/_tensor.py: SymExprImpl.type."""

    INT = 0


class PluginArgDataType(enum.Enum):
    """plugin/_tensor.py: SymExprImpl.dtype of SymInt8/16/32."""

    INT8 = 0
    INT16 = 1
    INT32 = 2


class CapabilityType(enum.Enum):
    """What the builder asks get_capability_interface for (IPluginV3)."""

    CORE = 0
    BUILD = 1
    RUNTIME = 2


class _Severity(enum.Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    """__init__.py: copies ILogger.Severity's members onto Logger."""

    Severity = _Severity


class Logger(ILogger):
    """plugin/__init__.py: ``trt.Logger().log(trt.Logger.WARNING, ...)``; messages are kept, not printed."""

    messages: list[tuple[Any, str]] = []

    def __init__(self, min_severity: Any = None) -> None:
        self.min_severity = min_severity

    def log(self, severity: Any, message: str) -> None:
        Logger.messages.append((severity, message))


class _Patched:
    """Classes __init__.py only decorates with deprecated context-manager methods."""


class ICudaEngine(_Patched): ...


class IExecutionContext(_Patched): ...


class Runtime(_Patched): ...


class IHostMemory(_Patched): ...


class Builder(_Patched): ...


class INetworkDefinition(_Patched): ...


class OnnxParser(_Patched): ...


class IBuilderConfig(_Patched): ...


class ITensor:
    """plugin/_lib.py: PluginDef.__call__ type check (network-API use, not the ONNX path)."""


class _Interface:
    """Base classes the Python plugin classes derive from and whose __init__ they call."""

    def __init__(self, *args: Any) -> None:
        pass


class IPluginV3(_Interface): ...


class IPluginV3QuickCore(_Interface): ...


class IPluginV3QuickBuild(_Interface): ...


class IPluginV3QuickRuntime(_Interface): ...


class IPluginV3QuickAOTBuild(_Interface): ...


class IPluginCreatorV3Quick(_Interface): ...


class ISymExpr(_Interface):
    """plugin/_tensor.py: SymExprImpl (an extra kernel argument handed to TensorRT)."""


class Dims(tuple):
    """plugin/_tensor.py: Shape, ShapeExprs (MAX_DIMS)."""

    MAX_DIMS = 8

    def __new__(cls, values: Any = ()) -> Dims:
        return super().__new__(cls, [] if isinstance(values, int) else values)


class DimsExprs(list):
    """plugin/_plugin_class.py get_output_shapes: ``trt.DimsExprs(n)`` filled with IDimensionExprs."""

    def __init__(self, length: int) -> None:
        super().__init__([None] * length)


class PluginTensorDesc:
    """plugin/_plugin_class.py: default format combinations (type, format); desc of a dynamic desc."""

    def __init__(self, dims: tuple[int, ...] = (), type: Any = None, format: Any = TensorFormat.LINEAR) -> None:
        self.dims, self.type, self.format, self.scale = Dims(dims), type, format, -1.0


class DynamicPluginTensorDesc:
    """plugin/_plugin_class.py configure_plugin/get_launch_params: ``.desc`` plus the profile's range."""

    def __init__(self, desc: PluginTensorDesc, *bounds: tuple[int, ...]) -> None:
        self.desc = desc
        self.min, self.opt, self.max = (Dims(b) for b in bounds)


class IDimensionExpr:
    """plugin/_tensor.py: what SymIntExpr wraps; ``is_constant()``, ``get_constant_value()``.

    Here an expression tree over named symbols (the dynamic dimensions of a profile), so a test can
    evaluate what the plugin returned for any concrete input shape: :meth:`evaluate`.
    """

    def __init__(self, op: Any, *operands: Any) -> None:
        self.op, self.operands = op, operands

    def is_constant(self) -> bool:
        return self.op == "const"

    def get_constant_value(self) -> int:
        if not self.is_constant():
            raise RuntimeError("not a build-time constant")
        return self.operands[0]

    def evaluate(self, env: dict[str, int]) -> int:
        if self.op == "const":
            return self.operands[0]
        if self.op == "symbol":
            return env[self.operands[0]]
        a, b = (operand.evaluate(env) for operand in self.operands)
        return _apply(self.op, a, b)


def _apply(op: DimensionOperation, a: int, b: int) -> int:
    """TensorRT's DimensionOperation semantics (IExprBuilder documentation)."""
    return {
        DimensionOperation.SUM: lambda: a + b,
        DimensionOperation.PROD: lambda: a * b,
        DimensionOperation.MAX: lambda: max(a, b),
        DimensionOperation.MIN: lambda: min(a, b),
        DimensionOperation.SUB: lambda: a - b,
        DimensionOperation.EQUAL: lambda: int(a == b),
        DimensionOperation.LESS: lambda: int(a < b),
        DimensionOperation.FLOOR_DIV: lambda: a // b,
        DimensionOperation.CEIL_DIV: lambda: -(-a // b),
    }[op]()


class IExprBuilder:
    """plugin/_tensor.py: ``constant(value)`` and ``operation(op, a, b)``; constant operands fold."""

    def constant(self, value: int) -> IDimensionExpr:
        if not isinstance(value, int):
            raise TypeError(f"IExprBuilder.constant takes an int, got {type(value).__name__}")
        return IDimensionExpr("const", value)

    def symbol(self, name: str) -> IDimensionExpr:
        """A dynamic input dimension (the builder's own expressions; not a binding method)."""
        return IDimensionExpr("symbol", name)

    def operation(self, op: DimensionOperation, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        if not isinstance(a, IDimensionExpr) or not isinstance(b, IDimensionExpr):
            raise TypeError(f"IExprBuilder.operation takes IDimensionExprs, got {type(a).__name__}, {type(b).__name__}")
        if a.is_constant() and b.is_constant():
            return self.constant(_apply(op, a.get_constant_value(), b.get_constant_value()))
        return IDimensionExpr(op, a, b)


class PluginField:
    """plugin/_lib.py, _plugin_class.py; also what the ONNX importer hands a creator.

    Holds raw bytes, a type and an element count as the C++ struct does; ``data`` views them as the
    binding's getter does (:data:`FIELD_DTYPES`).
    """

    def __init__(self, name: str = "", data: Any = b"", type: PluginFieldType = PluginFieldType.UNKNOWN) -> None:
        self.name, self.type = name, type
        array = np.frombuffer(bytes(data), dtype=np.uint8) if isinstance(data, bytes) else np.asarray(data)
        self._raw, self.size = array.tobytes(), array.size

    @classmethod
    def from_buffer(cls, name: str, raw: bytes, type: PluginFieldType, length: int) -> PluginField:
        """What ``nvinfer1::PluginField(name, data, type, length)`` holds when C++ builds one."""
        field = cls(name, b"", type)
        field._raw, field.size = raw, length
        return field

    @property
    def data(self) -> np.ndarray:
        if self.type not in FIELD_DTYPES:
            raise AssertionError(f"No known conversion for returning data from PluginField ({self.type})")
        return np.frombuffer(self._raw, dtype=FIELD_DTYPES[self.type], count=self.size).copy()


class PluginFieldCollection(list):
    """plugin/_lib.py, _plugin_class.py: constructed from a list of PluginFields, iterable."""


class _PluginRegistry:
    """plugin/_lib.py _register_plugin_creator: ``register_creator`` then ``get_creator``."""

    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator: Any, plugin_namespace: str = "") -> bool:
        key = (creator.name, creator.plugin_version, plugin_namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, plugin_namespace: str = "") -> Any:
        return self.creators.get((name, version, plugin_namespace))




class LaunchParamsSetter:
    """What TensorRT passes as ``launchParams`` to get_launch_params: seven settable SymExprImpls."""

    grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = None


class SymExprSetter(list):
    """What TensorRT passes as ``symExprSetter``: ``nbSymExprs`` then one SymExprImpl per index."""

    @property
    def nbSymExprs(self) -> int:  # noqa: N802 - the binding's name
        return len(self)

    @nbSymExprs.setter
    def nbSymExprs(self, count: int) -> None:  # noqa: N802
        self[:] = [None] * count


def _core_module(*, aot: bool) -> types.ModuleType:
    """The stand-in as the module ``tensorrt_bindings.tensorrt``, with a registry of its own.

    ``aot=False`` leaves out QuickPluginCreationRequest, as TensorRT releases before AOT plugins do.
    """
    core = types.ModuleType(CORE_MODULE, "Stand-in for TensorRT's compiled core (tests only).")
    public = {name: value for name, value in globals().items() if not name.startswith("_")}
    registry = _PluginRegistry()
    core.get_plugin_registry = lambda: registry  # plugin/_lib.py: the process-wide registry
    if aot:
        core.QuickPluginCreationRequest = QuickPluginCreationRequest
    for name in (
        "DataType", "DimensionOperation", "PluginFieldType", "TensorFormat", "TensorRTPhase", "PluginArgType",
        "PluginArgDataType", "ILogger", "Logger", "ICudaEngine",
        "IExecutionContext", "Runtime", "IHostMemory", "Builder", "INetworkDefinition", "OnnxParser",
        "IBuilderConfig", "ITensor", "IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild",
        "IPluginV3QuickRuntime", "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick", "ISymExpr", "Dims", "DimsExprs",
        "PluginTensorDesc", "DynamicPluginTensorDesc", "IDimensionExpr", "IExprBuilder", "PluginField",
        "PluginFieldCollection",
    ):  # fmt: skip
        setattr(core, name, public[name])
    # __init__.py's nptype and itemsize tables, plugin/_plugin_class.py's dtype comparisons.
    for alias, member in (("float32", "FLOAT"), ("float16", "HALF"), ("bfloat16", "BF16"), ("int8", "INT8"),
                          ("int32", "INT32"), ("int64", "INT64"), ("bool", "BOOL"), ("uint8", "UINT8"),
                          ("fp8", "FP8"), ("int4", "INT4"), ("fp4", "FP4")):  # fmt: skip
        setattr(core, alias, DataType[member])
    return core


@contextmanager
def python_layer(layer_dir: Path, *, aot: bool = True) -> Iterator[types.ModuleType]:
    """``import tensorrt`` gives the wheel's Python code over the stand-in core while inside.

    The ``tensorrt`` package is built as the ``tensorrt-cu13`` meta package's ``__init__.py`` does
    (``from tensorrt_bindings import *`` and ``__version__``), with the wheel's ``tensorrt_bindings``
    folder as its path so ``tensorrt.plugin`` is the wheel's own ``plugin/``.
    """
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] in ("tensorrt", PACKAGE)}
    for name in saved:
        del sys.modules[name]
    sys.modules[CORE_MODULE] = _core_module(aot=aot)
    sys.path.insert(0, str(layer_dir))
    try:
        import tensorrt_bindings  # noqa: PLC0415 - the wheel's __init__.py, over the stand-in

        trt = types.ModuleType("tensorrt")
        trt.__path__ = list(tensorrt_bindings.__path__)
        exec("from tensorrt_bindings import *\nfrom tensorrt_bindings import __version__", trt.__dict__)
        sys.modules["tensorrt"] = trt
        yield trt
    finally:
        sys.path.remove(str(layer_dir))
        for name in [n for n in sys.modules if n.split(".")[0] in ("tensorrt", PACKAGE)]:
            del sys.modules[name]
        sys.modules.update(saved)
