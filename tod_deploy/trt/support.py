"""Would TensorRT 11 build this ONNX file? A static check against the parser's operator table.

The table (``onnx_support.json``, package data) is ONNX-TensorRT's operator support matrix with its
source and TensorRT version, plus our own plugins. :func:`check_model` walks every node (subgraphs and
model-local functions included) and gives each one a row:

- ``supported``: a standard op the parser takes, within the restrictions we can check statically;
- ``plugin``: a custom-domain node that needs a TensorRT plugin this project provides (``tod::BinaryConv2d``);
- ``warning``: the parser takes it, with a caveat that depends on run time or on the TensorRT 11 minor version;
- ``unsupported``: the parser has no importer for it (not in the table, or marked N);
- ``restricted``: the op is supported but this node breaks one of its restrictions (TopK's K, Resize modes, ...);
- ``missing-plugin``: a custom-domain node for which we have no plugin.

The last three would stop the engine build; each names the reason and the fix. Nothing here imports
TensorRT: the check runs on any machine.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tod_deploy.errors import UserError

TABLE_FILE = Path(__file__).with_name("onnx_support.json")
TARGETS = ("tensorrt",)
FAILING = ("unsupported", "restricted", "missing-plugin")

# Fixes for ops the parser lacks, where one exists in our own toolchain; others get the generic fix.
UNSUPPORTED_FIXES = {
    "DynamicQuantizeLinear": "quantize statically (explicit INT8 Q/DQ from calibration) instead",
    "ConvInteger": "use QuantizeLinear/DequantizeLinear around a float Conv (explicit Q/DQ) instead",
    "MatMulInteger": "use QuantizeLinear/DequantizeLinear around a float MatMul (explicit Q/DQ) instead",
    "QLinearConv": "save the quantized model in Q/DQ format (QuantFormat.QDQ), not QOperator",
    "QLinearMatMul": "save the quantized model in Q/DQ format (QuantFormat.QDQ), not QOperator",
    "MaxRoiPool": "use RoiAlign (mode max) instead",
}
GENERIC_FIX = "rewrite it with supported ops (onnx-graphsurgeon) or register a TensorRT plugin named '{op}'"
QDQ_FIX = (
    "quantize symmetrically to int8 (zero point 0): tod-deploy quantize --precision int8 --target tensorrt, "
    "ModelOpt int8, or onnxruntime quantize_static with "
    "activation_type=QuantType.QInt8, weight_type=QuantType.QInt8 and extra_options={'ActivationSymmetric': True}"
)
DTYPE_NAMES = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()} | {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
}


@cache
def load_table() -> dict[str, Any]:
    """The operator table: TensorRT version, sources, opset range, ops (supported, types, rules), plugins."""
    return json.loads(TABLE_FILE.read_text())


@dataclass
class NodeRow:
    node: str
    op_type: str
    domain: str
    status: str  # supported | plugin | warning | unsupported | restricted | missing-plugin
    reason: str = ""
    fix: str = ""
    plugin: str = ""
    detail: str = ""  # the checked values, e.g. "K=3000"
    graph: str = "main"  # "main", "<node>/<attribute>" for a subgraph, "function <domain>::<name>" for a local one


@dataclass
class PluginUse:
    plugin: str
    domain: str
    op_type: str
    nodes: int
    available: bool
    provided_by: str
    fix: str


@dataclass
class CheckReport:
    model: str
    target: str
    tensorrt: str
    opset: int
    source: dict[str, Any]
    rows: list[NodeRow]
    plugins: list[PluginUse]
    model_problems: list[dict[str, str]] = field(default_factory=list)  # opset out of range and the like

    @property
    def problems(self) -> list[NodeRow]:
        return [r for r in self.rows if r.status in FAILING]

    @property
    def warnings(self) -> list[NodeRow]:
        return [r for r in self.rows if r.status == "warning"]

    @property
    def ok(self) -> bool:
        """True when TensorRT 11 would build the engine (given the plugins we provide)."""
        return not self.problems and not any(p["level"] == "error" for p in self.model_problems)

    def op_counts(self) -> list[tuple[str, str, int]]:
        """(op, worst status, node count) per op type, the terminal's overview."""
        order = ["supported", "plugin", "warning", "restricted", "unsupported", "missing-plugin"]
        worst: dict[str, str] = {}
        counts: Counter[str] = Counter()
        for r in self.rows:
            key = f"{r.domain}::{r.op_type}" if r.domain not in ("", "ai.onnx") else r.op_type
            counts[key] += 1
            if order.index(r.status) >= order.index(worst.get(key, "supported")):
                worst[key] = r.status
        return [(k, worst[k], counts[k]) for k in sorted(counts)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "tensorrt": self.tensorrt,
            "opset": self.opset,
            "would_build": self.ok,
            "source": self.source,
            "summary": {
                "nodes": len(self.rows),
                "problems": len(self.problems),
                "warnings": len(self.warnings),
                "plugin_nodes": sum(r.status == "plugin" for r in self.rows),
            },
            "model_problems": self.model_problems,
            "plugins": [asdict(p) for p in self.plugins],
            "nodes": [asdict(r) for r in self.rows],
        }


def check_model(path: Path, target: str = "tensorrt") -> CheckReport:
    """Check an ONNX file against TensorRT 11's ONNX parser; raises UserError for unreadable input."""
    if target not in TARGETS:
        raise UserError(f"unknown target '{target}'", f"use --target {' or '.join(TARGETS)}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist", "pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: the file is not an ONNX model
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__})", "re-export it") from exc
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path} is not a readable ONNX model (no graph)", "re-export it")
    return check_proto(model, str(path))


def check_proto(model: onnx.ModelProto, name: str = "<model>") -> CheckReport:
    table = load_table()
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is a help, not a requirement (e.g. custom ops it cannot type)
        inferred = model
    checker = _Checker(table, inferred)
    opset = checker.opset
    model_problems = _opset_problems(table, opset)
    rows = list(checker.walk(inferred.graph, "main"))
    return CheckReport(
        model=name,
        target="tensorrt",
        tensorrt=table["tensorrt"],
        opset=opset,
        source=table["source"],
        rows=rows,
        plugins=_plugin_uses(table, rows),
        model_problems=model_problems,
    )


def _opset_problems(table: dict[str, Any], opset: int) -> list[dict[str, str]]:
    lo, hi, hi_latest = table["opset"]["min"], table["opset"]["max"], table["opset"]["max_from_11_5"]
    if opset < lo or opset > hi_latest:
        return [{
            "level": "error",
            "reason": f"ONNX opset {opset} is outside TensorRT 11's range ({lo}..{hi_latest})",
            "fix": "export with --opset 18",
        }]  # fmt: skip
    if opset > hi:
        return [{
            "level": "warning",
            "reason": f"ONNX opset {opset} needs TensorRT 11.5 or later ({hi} before)",
            "fix": "export with --opset 18 for older TensorRT 11 releases",
        }]  # fmt: skip
    return []


def _plugin_uses(table: dict[str, Any], rows: list[NodeRow]) -> list[PluginUse]:
    counts = Counter((r.plugin, r.domain, r.op_type) for r in rows if r.status in ("plugin", "missing-plugin"))
    uses = []
    for (plugin, domain, op_type), n in sorted(counts.items()):
        known = table["plugins"].get(plugin)
        uses.append(
            PluginUse(
                plugin=plugin, domain=domain, op_type=op_type, nodes=n, available=bool(known and known["available"]),
                provided_by=known["tensorrt_plugin"] if known else "",
                fix=known["fix_without_plugin"] if known else GENERIC_FIX.format(op=op_type),
            )
        )  # fmt: skip
    return uses


class _Checker:
    def __init__(self, table: dict[str, Any], model: onnx.ModelProto) -> None:
        self.table = table
        self.ops: dict[str, Any] = table["ops"]
        self.default_domains = set(table["default_domains"])
        self.plugins = {(p["domain"], p["op_type"]): name for name, p in table["plugins"].items()}
        self.opset = next((o.version for o in model.opset_import if o.domain in self.default_domains), 0)
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.domain_versions = {o.domain: o.version for o in model.opset_import}
        self.detail = ""  # set by a rule check while it looks at a node
        self.consts: dict[str, np.ndarray] = {}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}
        self._index(model.graph)

    # -- what is known about tensors: constants, element types, static shapes --
    def _index(self, graph: onnx.GraphProto) -> None:
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.shapes[init.name] = list(init.dims)
            if not init.HasField("data_location") or init.data_location != onnx.TensorProto.EXTERNAL:
                try:
                    self.consts[init.name] = numpy_helper.to_array(init)
                except Exception:  # exotic dtypes we never need the value of
                    pass
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            t = vi.type.tensor_type
            if t.elem_type:
                self.types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in self.default_domains and node.output:
                attr = next((a for a in node.attribute if a.name in ("value", "value_int", "value_ints")), None)
                if attr is not None:
                    value = helper.get_attribute_value(attr)
                    self.consts[node.output[0]] = (
                        numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.array(value)
                    )
            for attr in node.attribute:
                for sub in _subgraphs(attr):
                    self._index(sub)

    def const(self, node: onnx.NodeProto, i: int) -> np.ndarray | None:
        return self.consts.get(node.input[i]) if i < len(node.input) and node.input[i] else None

    def dtype(self, name: str) -> str | None:
        t = self.types.get(name)
        return DTYPE_NAMES.get(t) if t else None

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else None

    # -- the walk --
    def walk(self, graph: onnx.GraphProto, where: str) -> Iterator[NodeRow]:
        for i, node in enumerate(graph.node):
            name = node.name or f"{node.op_type}_{i}"
            yield self.check_node(node, name, where)
            for attr in node.attribute:
                for sub in _subgraphs(attr):
                    yield from self.walk(sub, f"{name}/{attr.name}")

    def check_node(self, node: onnx.NodeProto, name: str, where: str) -> NodeRow:
        row = NodeRow(node=name, op_type=node.op_type, domain=node.domain, status="supported", graph=where)
        if node.domain not in self.default_domains:
            return self.check_custom(node, row)
        spec = self.ops.get(node.op_type)
        if spec is None or not spec["supported"]:
            row.status = "unsupported"
            row.reason = (
                f"{node.op_type} is not in TensorRT's ONNX operator table"
                if spec is None
                else f"TensorRT's ONNX parser does not support {node.op_type}"
            )
            row.fix = UNSUPPORTED_FIXES.get(node.op_type, GENERIC_FIX.format(op=node.op_type))
            return row
        rule_check = RULE_CHECKS.get(node.op_type)
        rules = spec.get("rules", {})
        self.detail = ""
        problems: list[tuple[str, str, str]] = []  # (level, reason, fix)
        if "input_types" in rules and node.input:
            problems += _check_input_type(self, node, rules["input_types"])
        if "constant_inputs" in rules:
            problems += _check_constant_inputs(self, node, rules["constant_inputs"], "error")
        if rule_check is not None:
            problems += rule_check(self, node, rules)
        row.detail = self.detail
        errors = [p for p in problems if p[0] == "error"]
        shown = errors or problems
        if shown:
            row.status = "restricted" if errors else "warning"
            row.reason = "; ".join(dict.fromkeys(p[1] for p in shown))
            row.fix = "; ".join(dict.fromkeys(p[2] for p in shown if p[2]))
        return row

    def check_custom(self, node: onnx.NodeProto, row: NodeRow) -> NodeRow:
        plugin = self.plugins.get((node.domain, node.op_type))
        if plugin is not None:
            spec = self.table["plugins"][plugin]
            row.plugin = plugin
            row.status = "plugin" if spec["available"] else "missing-plugin"
            row.reason = f"custom op, runs as TensorRT plugin {plugin}"
            if not spec["available"]:
                row.reason = f"needs TensorRT plugin {plugin}, which this project does not provide yet"
                row.fix = spec["fix_without_plugin"]
            versions = spec["versions"]  # version 1 is read as the newest (plugins.tensorrt_view)
            version = self.domain_versions.get(node.domain, versions[-1])
            if version not in versions:
                row.status = "missing-plugin"
                row.reason = f"{plugin} version {version}; our plugin builds versions {', '.join(map(str, versions))}"
                row.fix = f"re-export with this tod-deploy, or {spec['fix_without_plugin']}"
            elif version != versions[-1]:
                row.detail = f"op version {version}, built as version {versions[-1]}"
            return row
        function = self.functions.get((node.domain, node.op_type))
        if function is not None:  # the parser inlines model-local functions: check their bodies instead
            inner = [self.check_node(n, n.name or n.op_type, f"function {node.domain}::{node.op_type}")
                     for n in function.node]  # fmt: skip
            bad = [r for r in inner if r.status in FAILING]
            if bad:
                row.status = "unsupported"
                row.reason = "model-local function; inside it: " + "; ".join(f"{r.op_type}: {r.reason}" for r in bad)
                row.fix = bad[0].fix
            else:
                row.reason = "model-local function, inlined by the parser"
            return row
        row.plugin = f"{node.domain}::{node.op_type}"
        row.status = "missing-plugin"
        row.reason = f"custom op of domain '{node.domain}': needs a TensorRT plugin this project does not have"
        row.fix = (
            "export with --binary-conv decompose"
            if node.domain == "tod"
            else f"register a TensorRT plugin named '{node.op_type}' before parsing, or replace the node with "
            "standard ops"
        )
        return row


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


Problems = list[tuple[str, str, str]]


def _check_input_type(c: _Checker, node: onnx.NodeProto, allowed: list[str]) -> Problems:
    dtype = c.dtype(node.input[0])
    if dtype is None or dtype in allowed:
        return []
    fix = "cast the input to float32 (or float16) before this node" if dtype == "float64" else ""
    return [("error", f"input type {dtype} is not one TensorRT takes for {node.op_type} ({', '.join(allowed)})", fix)]


def _check_constant_inputs(c: _Checker, node: onnx.NodeProto, indices: list[int], level: str) -> Problems:
    names = {1: "axes", 2: "max_output_boxes_per_class", 3: "iou_threshold", 4: "score_threshold"}
    if node.op_type == "OneHot":
        names = {1: "depth"}
    if node.op_type == "CumSum":
        names = {1: "axis"}
    out = []
    for i in indices:
        if i < len(node.input) and node.input[i] and node.input[i] not in c.consts:
            what = names.get(i, f"input {i}")
            out.append((level, f"{what} is computed at run time; TensorRT needs it as a build-time constant",
                        "fold constants (onnx-graphsurgeon fold_constants) or make it an initializer"))  # fmt: skip
    return out


def _allowed(node: onnx.NodeProto, rules: dict[str, Any], attr: str, default: Any) -> Problems:
    value = _attr(node, attr, default)
    if value in rules[attr]:
        return []
    options = ", ".join(map(str, rules[attr]))
    return [("error", f"{attr}={value} is not supported by TensorRT (supported: {options})", "")]


def _check_topk(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    out = _allowed(node, rules, "sorted", 1)
    if out:
        out = [(lvl, reason, "export with sorted top-k (torch.topk(..., sorted=True))") for lvl, reason, _ in out]
    max_k = rules["max_k"]
    k = c.const(node, 1)
    fix = f"lower the top-k that feeds it to <= {max_k} (--top-k, or the recipe's rpn_nms_pre / rpn_max_per_img)"
    if k is not None:
        k_value = int(np.asarray(k).reshape(-1)[0])
        c.detail = f"K={k_value}"
        if k_value > max_k:
            out.append(("error", f"K={k_value} exceeds TensorRT's TopK limit of {max_k}", fix))
        return out
    shape = c.shapes.get(node.input[0])
    axis = _attr(node, "axis", -1)
    bound = shape[axis] if shape and -len(shape) <= axis < len(shape) else None
    if bound is None or bound > max_k:
        bounded = f" (it can reach {bound})" if bound else ""
        out.append(("warning", f"K is computed at run time{bounded}; TensorRT's TopK takes K <= {max_k}",
                    f"make sure K stays <= {max_k}: " + fix.split("(", 1)[1].rstrip(")")))  # fmt: skip
    return out


def _check_resize(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    out: Problems = []
    mode = _attr(node, "mode", "nearest")
    for attr, default in (("coordinate_transformation_mode", "half_pixel"), ("mode", "nearest"),
                          ("keep_aspect_ratio_policy", "stretch"), ("antialias", 0)):  # fmt: skip
        out += _allowed(node, rules, attr, default)
    if mode == "nearest":
        out += _allowed(node, rules, "nearest_mode", "round_prefer_floor")
    axes = _attr(node, "axes")
    rank = c.rank(node.input[0])
    if axes is not None and rank is not None and len(node.input) > 2 and node.input[2]:
        if [a % rank for a in axes] != list(range(rank)):
            out.append(("error", f"axes={list(axes)} with a scales input: TensorRT needs axes 0..{rank - 1}", ""))
    if out:
        fix = "export with mode nearest or (bi)linear, half_pixel/align_corners coordinates and no antialiasing"
        out = [(lvl, reason, fix_ or fix) for lvl, reason, fix_ in out]
    return out


def _check_grid_sample(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    out = _allowed(node, rules, "mode", "bilinear" if c.opset < 20 else "linear")
    out += _allowed(node, rules, "padding_mode", "zeros")
    rank = c.rank(node.input[0])
    if rank is not None and rank not in rules["input_rank"]:
        if rank in rules["input_rank_from_11_2_1"]:
            out.append(("warning", f"{rank}-D input (3-D sampling) needs TensorRT 11.2.1 or later", ""))
        else:
            out.append(("error", f"{rank}-D input: TensorRT's GridSample takes 4-D (or 5-D from 11.2.1)", ""))
    return out


def _check_deform_conv(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    out: Problems = []
    rank = c.rank(node.input[0])
    kernel = _attr(node, "kernel_shape")
    spatial = rank - 2 if rank is not None else (len(kernel) if kernel else None)
    if spatial is not None and spatial not in rules["spatial_rank"]:
        out.append(("error", f"{spatial}-D DeformConv: TensorRT takes 1-D or 2-D spatial input only", ""))
    pads = list(_attr(node, "pads", []) or [])
    if pads and len(pads) % 2 == 0:
        half = len(pads) // 2
        if pads[:half] != pads[half:]:
            out.append(("error", f"pads={pads}: TensorRT needs equal begin and end pads on each axis",
                        "pad the input with an explicit Pad node and use symmetric DeformConv pads"))  # fmt: skip
    return out


def _check_roi_align(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    return _allowed(node, rules, "mode", "avg") + _allowed(
        node, rules, "coordinate_transformation_mode", "half_pixel" if c.opset >= 16 else "output_half_pixel"
    )


def _check_nms(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    out = _check_constant_inputs(c, node, rules["constant_inputs"], "warning")
    scores = c.shapes.get(node.input[1]) if len(node.input) > 1 else None  # [batch, classes, boxes]
    limit = rules["topk_box_limit"]
    if scores and len(scores) == 3 and all(isinstance(d, int) and d > 0 for d in scores[1:]):
        candidates = scores[1] * scores[2]
        c.detail = f"boxes={candidates}"
        if candidates > limit:
            out.append((
                "warning",
                f"{candidates} candidate boxes, but TensorRT's NMS looks at the best {limit} only "
                f"({rules['topk_box_limit_sm53_sm62']} on SM 5.3/6.2): builds, may differ from onnxruntime",
                f"keep at most {limit} candidates before NMS (e.g. lower rpn_nms_pre, or a top-k before the "
                "class-wise NMS)",
            ))  # fmt: skip
    return out


def _check_scatter_nd(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    out = _allowed(node, rules, "reduction", "none")
    return [(lvl, reason, "write the reduction out (e.g. GatherND + Add + ScatterND)") for lvl, reason, _ in out]


def _zero_point_problems(c: _Checker, node: onnx.NodeProto, tensor_name: str) -> Problems:
    zp = c.const(node, 2)
    if len(node.input) > 2 and node.input[2]:
        if zp is None:
            return [("error", f"{tensor_name} is computed at run time; TensorRT needs a constant zero", QDQ_FIX)]
        if np.any(np.asarray(zp, dtype=np.float64) != 0):
            return [("error", f"{tensor_name} is not zero (asymmetric quantization)", QDQ_FIX)]
    return []


def _check_dequantize(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    out = _zero_point_problems(c, node, "x_zero_point")
    dtype = c.dtype(node.input[0])
    if dtype is not None and dtype not in rules["input_types"]:
        out.append(("error", f"{dtype} quantized input: TensorRT dequantizes int8, fp8, fp4 or int4", QDQ_FIX))
    return out


def _check_quantize(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    out = _zero_point_problems(c, node, "y_zero_point")
    zp_type = c.types.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    code = zp_type or _attr(node, "output_dtype", 0)
    out_type = DTYPE_NAMES.get(code) if code else None
    if out_type is not None and out_type not in rules["output_types"]:
        out.append(("error", f"quantizes to {out_type}: TensorRT quantizes to int8, fp8, fp4 or int4", QDQ_FIX))
    return out


def _check_squeeze(c: _Checker, node: onnx.NodeProto, rules: dict[str, Any]) -> Problems:
    if c.opset >= 13 and (len(node.input) < 2 or not node.input[1]):
        return [("warning", "Squeeze without axes needs TensorRT 11.5 or later", "export with explicit axes")]
    return []


# What the terminal says was checked, per op with rules (the JSON table holds the full restriction text).
CHECKED = {
    "TopK": "K <= 3840, sorted, input type",
    "Resize": "mode, coordinate/nearest modes, no antialias",
    "GridSample": "4-D input, mode, padding mode, type",
    "DeformConv": "1-D/2-D, symmetric pads, type",
    "RoiAlign": "mode, coordinate mode, type",
    "NonMaxSuppression": "candidates <= 5000, constant limits, type",
    "Sign": "input type",
    "ScatterND": "reduction none",
    "DequantizeLinear": "zero point 0, int8/fp8/fp4/int4",
    "QuantizeLinear": "zero point 0, int8/fp8/fp4/int4",
}

RULE_CHECKS = {
    "TopK": _check_topk,
    "Resize": _check_resize,
    "GridSample": _check_grid_sample,
    "DeformConv": _check_deform_conv,
    "RoiAlign": _check_roi_align,
    "NonMaxSuppression": _check_nms,
    "ScatterND": _check_scatter_nd,
    "DequantizeLinear": _check_dequantize,
    "QuantizeLinear": _check_quantize,
    "Squeeze": _check_squeeze,
}


# -- terminal rendering (the CLI prints these; JSON holds everything) --


def check_tables(report: CheckReport) -> list[Any]:
    """Rich tables: the ops that carry TensorRT restrictions or need plugins, then every problem with its fix."""
    from rich.table import Table

    table = Table(
        title=f"TensorRT {report.tensorrt} check: {Path(report.model).name} (opset {report.opset})",
        caption_justify="left",
    )
    for column in ("op", "nodes", "status", "checked", "values"):
        table.add_column(column, justify="right" if column == "nodes" else "left")
    details: dict[str, list[str]] = {}
    for r in report.rows:
        if r.detail:
            details.setdefault(r.op_type, []).append(r.detail)
    plain = []
    for op, status, n in report.op_counts():
        if status == "supported" and op not in CHECKED:
            plain.append(op)
            continue
        checked = "TensorRT plugin" if "::" in op else CHECKED.get(op, "in the operator table")
        values = ", ".join(dict.fromkeys(details.get(op, [])))
        if values and len({v.split("=")[0] for v in details[op]}) == 1:  # "K=1000, K=100" -> "K 1000, 100"
            key = details[op][0].split("=")[0]
            values = f"{key} " + ", ".join(dict.fromkeys(v.split("=", 1)[1] for v in details[op]))
        table.add_row(op, str(n), status, checked, values)
    table.caption = f"other ops, supported: {', '.join(plain)}" if plain else None
    tables: list[Any] = [table]
    if report.plugins:
        plugins = Table(title="plugins the engine needs")
        for column in ("plugin", "nodes", "in this project", "provided by / fix without it"):
            plugins.add_column(column, justify="right" if column == "nodes" else "left")
        for p in report.plugins:
            plugins.add_row(p.plugin, str(p.nodes), "yes" if p.available else "NO", p.provided_by or p.fix)
        tables.append(plugins)
    for title, rows in (("would not build", report.problems), ("warnings", report.warnings)):
        model_rows = [p for p in report.model_problems if (p["level"] == "error") == (title == "would not build")]
        if not rows and not model_rows:
            continue
        problems = Table(title=title)
        for column in ("node", "op", "status", "reason", "fix"):
            problems.add_column(column)
        for p in model_rows:
            problems.add_row("(model)", "opset", p["level"], p["reason"], p["fix"])
        for r in rows:
            op = f"{r.domain}::{r.op_type}" if r.domain not in ("", "ai.onnx") else r.op_type
            node = r.node if r.graph == "main" else f"{r.node} (in {r.graph})"
            problems.add_row(node, op, r.status, r.reason, r.fix or "-")
        tables.append(problems)
    return tables


def summary_line(report: CheckReport) -> str:
    plugin_nodes = sum(r.status == "plugin" for r in report.rows)
    plugins = f", {plugin_nodes} plugin nodes ({', '.join(p.plugin for p in report.plugins)})" if plugin_nodes else ""
    warnings = f", {len(report.warnings)} warnings" if report.warnings else ""
    if report.ok:
        return f"TensorRT {report.tensorrt} would build it: {len(report.rows)} nodes{plugins}{warnings}"
    n = len(report.problems) + sum(p["level"] == "error" for p in report.model_problems)
    return f"TensorRT {report.tensorrt} would NOT build it: {n} problem(s), {len(report.rows)} nodes{plugins}{warnings}"
