"""What each node of an exported detector is, as far as precision goes.

Both precision passes need the same map of the graph:

* quantizable layers: ``Conv``, ``MatMul``, ``Gemm`` of the default domain (what INT8 Q/DQ wraps);
* the stem: the first of them (it sees raw pixels, where one quantization step is widest; measured on
  trained CFINet, onnxruntime layout, 512x512, AMD EPYC AVX2: its stem in INT8 ran the file 2% faster,
  733.7 -> 718.6 ms, and cost 1.8 points of fidelity, 78.6 -> 76.8 on 32 held-out images);
* the last layer of each head: a layer from whose output some path reaches a graph output or a
  named raw/parity tensor without passing through another layer (class and box predictors, the
  RPN's maps, SR-TOD's reconstruction output);
* the post-processing tail: every node on those paths (box decoding, Exp/Log, anchor arithmetic,
  sigmoid/softmax, score thresholds, TopK, NonMaxSuppression, RoiAlign's coordinates, the
  Gather/Concat bookkeeping around them);
* ``tod`` domain nodes (1-bit convolutions), which only run in FP32, and every node upstream of
  their inputs: a 1-bit layer takes the sign of its input, and one sign flipped by rounding
  cascades through a 1-bit network (measured: DFR-Det's box outputs moved ~50% under FP16); INT8
  checks which real layers there keep those signs (:mod:`tod_deploy.quant.binary_inputs`);
* the sampling arithmetic: the nodes from the nearest layers to a ``GridSample``'s grid (Deformable-DETR's
  reference points plus offsets), which are coordinates like post-processing's, and from its output to
  the next layers (the attention-weighted sum of the samples), which GridSample leaves in float.

Shape-only paths (``Shape``/``Size``) carry no values, so they do not make a backbone layer "last".
"""

from __future__ import annotations

import json
import re
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from tod_deploy.errors import UserError

QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
SHAPE_OPS = ("Shape", "Size")
CUSTOM_DOMAIN = "tod"


def is_layer(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in QUANTIZABLE_OPS


def is_custom(node: onnx.NodeProto) -> bool:
    return node.domain == CUSTOM_DOMAIN


def end_tensors(model: onnx.ModelProto) -> set[str]:
    """Graph outputs plus the raw/parity tensors named in the export's metadata (dense head outputs)."""
    names = {o.name for o in model.graph.output}
    for prop in model.metadata_props:
        if prop.key in ("raw_tensors", "parity_tensors"):
            try:
                names.update(str(n) for n in json.loads(prop.value))
            except (json.JSONDecodeError, TypeError):
                continue
    produced = {t for node in model.graph.node for t in node.output}
    return {n for n in names if n in produced}


@dataclass
class GraphRoles:
    layers: list[str] = field(default_factory=list)  # quantizable nodes, graph order
    stem: str | None = None
    last_layers: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)  # post-processing nodes, graph order
    custom: list[str] = field(default_factory=list)  # tod-domain nodes
    threshold_layers: list[str] = field(default_factory=list)  # layers that reach a Sign through no other layer
    threshold_arithmetic: list[str] = field(default_factory=list)  # the nodes between them and the Sign
    binarized_upstream: list[str] = field(default_factory=list)  # nodes whose values reach a tod node's input
    sampling_arithmetic: list[str] = field(default_factory=list)  # layers -> GridSample's grid, its output -> layers
    op_types: dict[str, str] = field(default_factory=dict)  # node name -> op type (all nodes)

    def default_fp32(self) -> dict[str, list[str]]:
        """Quantizable layers INT8 keeps in FP32 by default, by reason."""
        return {
            "stem": [self.stem] if self.stem else [],
            "last layer of a head": list(self.last_layers),
            "feeds a threshold (Sign)": list(self.threshold_layers),
            "feeds a 1-bit layer": [n for n in self.binarized_upstream if n in set(self.layers)],
        }


def graph_roles(model: onnx.ModelProto) -> GraphRoles:
    nodes = list(model.graph.node)
    names = [n.name for n in nodes]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise UserError(
            "the ONNX graph has unnamed or duplicate node names (needed to select layers)",
            "re-export it with tod-deploy export, which names every node",
        )
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for t in node.input:
            if t:
                consumers[t].append(node)
    ends = end_tensors(model)
    roles = GraphRoles(op_types={n.name: n.op_type for n in nodes})
    roles.layers = [n.name for n in nodes if is_layer(n)]
    roles.custom = [n.name for n in nodes if is_custom(n)]
    roles.stem = roles.layers[0] if roles.layers else None
    tail: set[str] = set()
    for node in nodes:
        if not is_layer(node):
            continue
        reached, reaches_end = _downstream(node, consumers, ends)
        if reaches_end:
            roles.last_layers.append(node.name)
            tail |= reached
    roles.tail = [n.name for n in nodes if n.name in tail]
    behind_sign = set(_behind_sign(nodes, {o.name for o in model.graph.output}))
    arithmetic: set[str] = set()
    for node in nodes:
        if is_layer(node) and node.name in behind_sign:
            reached, _ = _downstream(node, consumers, set())
            if any(roles.op_types[name] == "Sign" for name in reached):
                roles.threshold_layers.append(node.name)
                arithmetic |= reached & behind_sign
    roles.threshold_arithmetic = [n.name for n in nodes if n.name in arithmetic]
    roles.binarized_upstream = _upstream_of(nodes, [n.input[0] for n in nodes if is_custom(n) and n.input])
    grids = [n.input[1] for n in nodes if n.op_type == "GridSample" and len(n.input) > 1]
    sampling = set(_upstream_of(nodes, grids, stop=is_layer))
    for node in nodes:
        if node.op_type == "GridSample":
            sampling |= _downstream(node, consumers, set())[0]
    roles.sampling_arithmetic = [n.name for n in nodes if n.name in sampling]
    return roles


def layers_read_only_by(model: onnx.ModelProto, layers: list[str], readers: set[str]) -> list[str]:
    """The ``layers`` (graph order) whose every output is read, and read only, by nodes in ``readers``."""
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        for t in node.input:
            if t:
                consumers[t].append(node.name)
    wanted = set(layers)
    return [
        node.name
        for node in model.graph.node
        if node.name in wanted and all(consumers[t] and set(consumers[t]) <= readers for t in node.output if t)
    ]


def _upstream_of(
    nodes: list[onnx.NodeProto], tensors: list[str], stop: Callable[[onnx.NodeProto], bool] | None = None
) -> list[str]:
    """Nodes (graph order) whose values reach any of ``tensors``; shape-only paths do not count, and the walk
    neither includes nor passes the ``stop`` nodes."""
    producer = {out: node for node in nodes for out in node.output if out}
    found: set[str] = set()
    queue = deque(tensors)
    seen = set(queue)
    while queue:
        node = producer.get(queue.popleft())
        if node is None or node.op_type in SHAPE_OPS or node.name in found or (stop is not None and stop(node)):
            continue
        found.add(node.name)
        for t in node.input:
            if t and t not in seen:
                seen.add(t)
                queue.append(t)
    return [n.name for n in nodes if n.name in found]


def _behind_sign(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[str]:
    """Nodes that reach the graph outputs only through a ``Sign`` (a hard threshold, e.g. SR-TOD's mask).

    Of these, the layers that reach the Sign through no other layer stay in FP32 by default, with the
    arithmetic between them and the Sign (SR-TOD: the reconstruction's last conv, its sigmoid and the
    difference map): their error moves the threshold's input directly, by INT8 steps of the output's range.
    The layers before them are quantized. Measured on SR-TOD trained 388 steps (512x512, 8 held-out images,
    onnxruntime layout): keeping the whole reconstruction head in FP32 gave fidelity 96.5 at 2389 ms,
    keeping only its last conv 96.5 at 2170 ms (FP32: 3221 ms). Found by walking back from the outputs
    twice (once stopping at Sign nodes), so whole graphs take linear time.
    """
    if not any(n.op_type == "Sign" for n in nodes):
        return []
    producer = {out: node for node in nodes for out in node.output if out}

    def reaching(through_sign: bool) -> set[str]:
        """Tensors from which some path reaches a graph output (shape-only paths do not count)."""
        found = set(outputs)
        queue = deque(outputs)
        while queue:
            node = producer.get(queue.popleft())
            if node is None or node.op_type in SHAPE_OPS or (node.op_type == "Sign" and not through_sign):
                continue
            for t in node.input:
                if t and t not in found:
                    found.add(t)
                    queue.append(t)
        return found

    direct, any_path = reaching(False), reaching(True)
    return [
        n.name
        for n in nodes
        if n.op_type != "Sign" and any(t in any_path for t in n.output) and not any(t in direct for t in n.output)
    ]


def _downstream(
    start: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], ends: set[str]
) -> tuple[set[str], bool]:
    """Nodes reached from ``start``'s outputs without crossing a layer, a tod node or a shape op."""
    reached: set[str] = set()
    reaches_end = any(t in ends for t in start.output)
    queue = deque(t for t in start.output if t)
    seen_tensors: set[str] = set(queue)
    while queue:
        tensor = queue.popleft()
        for node in consumers.get(tensor, ()):
            if is_layer(node) or is_custom(node) or node.op_type in SHAPE_OPS or node.name in reached:
                continue
            reached.add(node.name)
            for out in node.output:
                if not out or out in seen_tensors:
                    continue
                seen_tensors.add(out)
                reaches_end = reaches_end or out in ends
                queue.append(out)
    return reached, reaches_end


def match_patterns(patterns: list[str], names: list[str]) -> dict[str, list[str]]:
    """Node names each regex matches (``re.search``); a bad regex or one matching nothing is a UserError.

    A pattern matching no node is refused rather than warned about: a typo would otherwise quantize
    the very layer the user meant to keep in FP32, silently.
    """
    out: dict[str, list[str]] = {}
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            problem = f"--exclude {pattern!r} is not a valid regular expression ({exc})"
            raise UserError(problem, "fix the pattern") from exc
        hits = [n for n in names if rx.search(n)]
        if not hits:
            example = ", ".join(names[:3])
            raise UserError(
                f"--exclude {pattern!r} matches no node name",
                f"patterns match node names such as {example} (see `tod-deploy quantize --report`)",
            )
        out[pattern] = hits
    return out


def float_tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor onnx's shape inference (plus Cast attributes) can name."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types: dict[str, int] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    for node in inferred.graph.node:
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                types[node.output[0]] = to
        elif node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
    return types
