"""What TensorRT's C++ side does with a Python-defined plugin, written after its public source.

- :func:`plugin_fields` is onnx-tensorrt's ``loadFields`` (onnxOpImporters.cpp): for each field the
  creator declares, in the creator's order, the node's attribute of that name becomes one field:
  INT -> kINT32 (one int32), FLOAT -> kFLOAT32, STRING -> kCHAR with the bytes and a terminating
  ``\\0`` counted in the length, INTS/FLOATS -> kINT32/kFLOAT32 arrays; attributes the creator does
  not declare are not passed, declared ones the node lacks are skipped with a warning.
- :func:`create_plugin` is its ``FallbackPluginImporter`` + ``createPlugin`` (importerUtils.cpp): the
  creator is looked up by op type, ``plugin_version`` (default "1") and ``plugin_namespace``
  (default "", then the node's domain); a V3 quick creator is called with the op type as name and a
  QuickPluginCreationRequest from the node's ``aot`` attribute (strict) or the network's
  PREFER_AOT/JIT flags, else UNKNOWN.
- :func:`build_plugin_layer` makes the builder's calls on the plugin in the order TensorRT makes
  them for an ``IPluginV3QuickAOTBuild`` (types, shapes, formats, configure, tactics, launch
  parameters, kernel), with input shapes given as expressions over named dynamic dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import tensorrt_standin as core

A = onnx.AttributeProto


def plugin_fields(node: onnx.NodeProto, declared: Any) -> list[core.PluginField]:
    """onnx-tensorrt's loadFields for ``node`` against the creator's ``field_names``."""
    attrs = {a.name: a for a in node.attribute}
    fields = []
    for declared_field in declared:
        attr = attrs.get(declared_field.name)
        if attr is None:
            continue  # the importer warns "Attribute ... not found in plugin node!" and goes on
        if attr.type == A.FLOAT:
            raw, kind, length = np.float32(attr.f).tobytes(), core.PluginFieldType.FLOAT32, 1
        elif attr.type == A.INT:
            raw, kind, length = np.array(attr.i).astype(np.int32).tobytes(), core.PluginFieldType.INT32, 1
        elif attr.type == A.STRING:
            raw = attr.s + b"\0"  # "Append \0 as end of C style string." (copyField(std::string))
            kind, length = core.PluginFieldType.CHAR, len(raw)
        elif attr.type == A.FLOATS:
            raw, kind = np.asarray(attr.floats, np.float32).tobytes(), core.PluginFieldType.FLOAT32
            length = len(attr.floats)
        elif attr.type == A.INTS:
            raw, kind = np.asarray(attr.ints).astype(np.int32).tobytes(), core.PluginFieldType.INT32
            length = len(attr.ints)
        else:
            raise NotImplementedError(f"attribute type {attr.type} is not used by tod nodes")
        fields.append(core.PluginField.from_buffer(declared_field.name, raw, kind, length))
    return fields


def _string_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    found = [a.s.decode() for a in node.attribute if a.name == name and a.type == A.STRING]
    return found[0] if found else default


def create_plugin(trt: Any, node: onnx.NodeProto, *, prefer: str | None = None) -> Any:
    """The plugin object TensorRT's ONNX parser creates for ``node`` (None if no creator is found)."""
    registry = trt.get_plugin_registry()
    version = _string_attr(node, "plugin_version", "1")
    namespace = _string_attr(node, "plugin_namespace", "")
    creator = registry.get_creator(node.op_type, version, namespace)
    if creator is None:
        namespace = node.domain
        creator = registry.get_creator(node.op_type, version, namespace)
    if creator is None:
        return None
    aot = [a.i for a in node.attribute if a.name == "aot" and a.type == A.INT]
    request = trt.QuickPluginCreationRequest
    if aot:
        choice = request.STRICT_AOT if aot[0] else request.STRICT_JIT
    else:
        choice = {"aot": request.PREFER_AOT, "jit": request.PREFER_JIT, None: request.UNKNOWN}[prefer]
    fields = trt.PluginFieldCollection(plugin_fields(node, creator.field_names))
    return creator.create_plugin(node.op_type, namespace, fields, trt.TensorRTPhase.BUILD, choice)


@dataclass
class PluginLayer:
    """What the builder learnt from the plugin: everything as expressions (evaluate them per shape)."""

    output_types: list[Any]
    output_shapes: list[list[core.IDimensionExpr]]
    launch: dict[str, Any]  # grid_x ... shared_mem -> SymExprImpl
    extra_args: list[Any]  # SymExprImpl, in order
    kernel_name: bytes | str
    ptx: bytes


def build_plugin_layer(
    plugin: Any,
    input_types: list[Any],
    input_shapes: list[tuple[int | str, ...]],
    profile: dict[str, tuple[int, int, int]],
) -> PluginLayer:
    """The builder's calls on an AOT quick plugin; string dims are named dynamic dimensions.

    ``profile`` gives each named dimension's (min, opt, max), which fills the dynamic descs.
    """
    builder = core.IExprBuilder()
    built = plugin.get_capability_interface(core.CapabilityType.BUILD)
    assert plugin.get_capability_interface(core.CapabilityType.CORE) is not None
    ranks = [len(shape) for shape in input_shapes]
    output_types = built.get_output_data_types(input_types, ranks)
    exprs = []
    for shape in input_shapes:
        dims = core.DimsExprs(len(shape))
        for i, d in enumerate(shape):
            dims[i] = builder.symbol(d) if isinstance(d, str) else builder.constant(d)
        exprs.append(dims)
    output_shapes = [list(dims) for dims in built.get_output_shapes(exprs, [], builder)]

    def desc(shape: tuple[int | str, ...], dtype: Any) -> core.DynamicPluginTensorDesc:
        pick = [tuple(profile[d][k] if isinstance(d, str) else d for d in shape) for k in range(3)]
        dims = tuple(-1 if isinstance(d, str) else d for d in shape)
        return core.DynamicPluginTensorDesc(core.PluginTensorDesc(dims, dtype), *pick)

    opt_env = {name: bounds[1] for name, bounds in profile.items()}
    out_shapes = [tuple(e.evaluate(opt_env) if not e.is_constant() else e.get_constant_value() for e in s)
                  for s in output_shapes]  # fmt: skip
    in_out = [desc(s, t) for s, t in zip(input_shapes, input_types, strict=True)]
    # Output dims: static values where constant, -1 where they depend on a dynamic dimension.
    in_out += [
        core.DynamicPluginTensorDesc(
            core.PluginTensorDesc(tuple(e.get_constant_value() if e.is_constant() else -1 for e in s), t), o, o, o
        )
        for s, t, o in zip(output_shapes, output_types, out_shapes, strict=True)
    ]
    combinations = built.get_supported_format_combinations(in_out, len(input_types))
    assert [c.format for c in combinations] == [core.TensorFormat.LINEAR] * len(in_out)
    built.configure_plugin(in_out[: len(input_types)], in_out[len(input_types) :])
    tactics = built.get_valid_tactics()
    engine_plugin = plugin.clone()  # the builder keeps a clone in the engine
    engine_plugin.set_tactic(tactics[0] if tactics else 0)
    launch, setter = core.LaunchParamsSetter(), core.SymExprSetter()
    engine_plugin.get_launch_params(exprs, in_out, len(input_types), launch, setter, builder)
    kernel_name, ptx = engine_plugin.get_kernel([d.desc for d in in_out[: len(input_types)]],
                                                [d.desc for d in in_out[len(input_types) :]])  # fmt: skip
    assert engine_plugin.get_timing_cache_id() == ""
    keys = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")
    return PluginLayer(
        output_types=list(output_types),
        output_shapes=output_shapes,
        launch={key: getattr(launch, key) for key in keys},
        extra_args=list(setter),
        kernel_name=kernel_name,
        ptx=ptx,
    )


def evaluate(expr: Any, env: dict[str, int]) -> int:
    """An IDimensionExpr, or a SymExprImpl holding one, at concrete dynamic dimensions."""
    inner = getattr(expr, "expr", expr)
    if not isinstance(inner, core.IDimensionExpr):
        raise TypeError(f"the plugin handed TensorRT a {type(inner).__name__}, not a dimension expression")
    return inner.evaluate(env)
