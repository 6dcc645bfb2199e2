"""Hard decisions and the one rule they are judged by.

A hard decision maps a real value to one of a few outcomes: a threshold's sign (SR-TOD's mask),
a 1-bit layer's input sign, a top-k or score-threshold selection, NMS keeping one of two
overlapping boxes. Two correct runtimes sum in different orders, so where the value lies within
rounding distance of the boundary they may decide differently: legitimate float behaviour, not
an export error, and it happens on one CPU and not on another. So everywhere:

- a differing decision ("flip") is excused only where its input agrees between the runtimes
  within the input's own tolerance (then it lies within that tolerance of the boundary); a flip
  far from the boundary fails;
- after a decision the reference is teacher-forced (forcing.py): it takes the backend's input to
  the decision, so one excused flip cannot fail every later tensor;
- selections (top-k, score threshold, NMS) are judged by the same margin, on the final detections
  and on proposals a second stage takes (a ``SelectedProposals`` marker, then forced in turn): a
  score within ``selection_margin`` of the boundary may go either way (:func:`selection_floor`,
  :func:`nms_near_tie`).

Decision sites are found in the ONNX graph: ``Sign`` nodes (named after their PyTorch module at
export, see :func:`name_decision_nodes`) and 1-bit layers, as ``tod::BinaryConv2d`` nodes or
decomposed into standard ops.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Container
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from tod_deploy.ops.binary_conv_ref import is_binary_conv
from tod_deploy.parity.policy import ParityPolicy
from tod_deploy.parity.report import DecisionParity

EXPORT_PREFIX = "model."  # ExportView holds the deploy model as ``model``
EXPORTER_NODE_PREFIX = "node_"  # how torch.onnx names nodes
SIGN_OPS = ("Greater", "Less")
BINARIZE_OPS = ("Pad", "Where", "Not", "Cast", *SIGN_OPS)
BINARY_LAYERS = "binary layers"
NAMED_OPS = ("Sign", "PRelu")  # nodes named after their module at export
CALL_SEPARATOR = ":"  # "<module path>:<k>" names the k-th repeated call's node
SLOPE_SUFFIX = ".weight"  # a fused slope named "<nn.PReLU path>.weight" came from that module


@dataclass(frozen=True)
class DecisionSite:
    kind: str  # "threshold" (a Sign node) | "1-bit input" (a binary layer)
    path: str  # the deciding module's path in the deploy model ('' if the file does not say)
    input: str  # ONNX tensor the decision is taken on
    output: str  # ONNX tensor after it: the Sign's output, or the binary layer's (after alpha and bias)
    # A tod::BinaryConv2d node's fused epilogue (op version 2): its output is then the layer's output
    # plus this residual tensor, then the activation; the reference applies it to its own output.
    residual: str = ""
    activation: str = "none"
    slope: tuple[float, ...] = ()  # the file's slopes
    slope_module: str = ""  # the nn.PReLU they came from, when the file says (the reference uses its own)

    @property
    def label(self) -> str:
        return BINARY_LAYERS if self.kind == "1-bit input" else (self.path or self.output)


@dataclass
class DecisionRecord:
    """One call of one decision site, as both runtimes saw it (arrays of the input's shape)."""

    site: DecisionSite
    ref_input: np.ndarray
    got_input: np.ndarray
    ref_decision: np.ndarray
    got_decision: np.ndarray
    ref_output: np.ndarray | None = None  # teacher-forced reference after the decision
    got_output: np.ndarray | None = None


@dataclass
class SelectionRecord:
    """One call of a selection (top-k + NMS of scored boxes), as both runtimes saw it."""

    name: str  # what was selected (e.g. "proposals")
    ref_boxes: np.ndarray  # [N, K, 4]
    ref_scores: np.ndarray  # [N, K], -1 where nothing was kept
    got_boxes: np.ndarray
    got_scores: np.ndarray
    nms_iou: float

    def as_detections(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Both selections in the detection contract's layout (one class), for detections.agree_detections."""

        def contract(boxes: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
            kept = scores >= 0
            return {"num_dets": kept.sum(axis=1), "boxes": boxes, "scores": scores, "labels": np.zeros(kept.shape)}

        return contract(self.ref_boxes, self.ref_scores), contract(self.got_boxes, self.got_scores)


def judge(record: DecisionRecord, row: DecisionParity, policy: ParityPolicy) -> None:
    """Fold one record into its row: input parity, flips (excused within tolerance), forced output."""
    atol, rtol = row.input.atol, row.input.rtol
    if record.ref_input.shape != record.got_input.shape:
        row.input.add(record.ref_input, record.got_input, None)
        return
    close = policy.within(record.ref_input, record.got_input, atol, rtol)
    row.input.add(record.ref_input, record.got_input, close)
    flipped = record.ref_decision != record.got_decision
    row.decisions += flipped.size
    row.flips += int(np.count_nonzero(flipped))
    row.excused += int(np.count_nonzero(flipped & close))
    if record.ref_output is not None and record.got_output is not None and row.output is not None:
        ref, got = record.ref_output, record.got_output
        same = ref.shape == got.shape
        row.output.add(ref, got, policy.within(ref, got, row.output.atol, row.output.rtol) if same else None)


def selection_floor(kept_scores: np.ndarray, threshold: float, policy: ParityPolicy) -> float:
    """Scores at or below this may be selected or not by a correct runtime: the K-th kept score
    and the score threshold, each plus the margin."""
    last = float(kept_scores[-1]) if kept_scores.size else threshold
    return max(last, threshold) + policy.selection_margin


# IoU of two boxes whose corners agree to box tolerance (1e-3 px at 512) moves by ~1e-3 / width: 1e-3 covers
# boxes down to about a pixel wide.
NMS_IOU_MARGIN = 1e-3


def nms_near_tie(ious: np.ndarray, scores: np.ndarray, score: float, nms_iou: float, policy: ParityPolicy) -> bool:
    """Could NMS have decided this box either way? Either an overlapping box scores within the margin
    (which of the two survives is a score tie), or a higher-scoring box overlaps it at an IoU within
    ``NMS_IOU_MARGIN`` of the NMS threshold (whether it is suppressed is an IoU tie)."""
    score_tie = (ious >= nms_iou - 0.01) & (np.abs(scores - score) <= policy.selection_margin)
    iou_tie = (np.abs(ious - nms_iou) <= NMS_IOU_MARGIN) & (scores >= score - policy.selection_margin)
    return bool(np.any(score_tie | iou_tie))


TIE, CASCADE = "tie", "cascade"


def explain_nms_differences(
    iou: np.ndarray,
    ref: tuple[np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray],
    only_ref: np.ndarray,
    only_got: np.ndarray,
    nms_iou: float,
    policy: ParityPolicy,
    got_last: float | None = None,
) -> dict[int, str]:
    """Which boxes kept by one runtime only (``only_ref``, ``only_got``: indices) a correct NMS explains.

    ``iou`` is reference x candidate; ``ref`` and ``got`` are (scores, labels). A difference is a
    ``TIE`` when NMS or a top-k could have decided it either way: :func:`nms_near_tie` against the other
    runtime's boxes, or a box kept by the other runtime only at the same score (two tied boxes, one
    taken). It is a ``CASCADE`` when a box the other runtime kept only, itself explained and scoring at
    least as high, overlaps it beyond the NMS threshold: NMS is greedy in score order, so one tie
    changes what every lower box overlapping the winner is suppressed by. A trained model makes such
    chains: where its features are dead, many anchors score exactly the same. ``got_last``: the
    candidate's last kept score when its list is full: where it kept more explained boxes than the
    reference did, as many reference boxes at or below that score fell off its end (also a ``CASCADE``).
    Returns the explained reference indices with their kind (the candidate's serve only as links)."""
    margin = policy.selection_margin
    sides = (
        (only_ref, ref, got, only_got, iou),
        (only_got, got, ref, only_ref, iou.T),
    )
    explained: list[dict[int, str]] = [{}, {}]
    for side, (mine, (scores, labels), (other_scores, other_labels), other_only, overlap) in enumerate(sides):
        for d in mine:
            same = other_labels == labels[d]
            rivals = other_only[other_labels[other_only] == labels[d]]
            exchanged = np.abs(other_scores[rivals] - scores[d]) <= margin
            if exchanged.any() or nms_near_tie(overlap[d, same], other_scores[same], float(scores[d]), nms_iou, policy):
                explained[side][int(d)] = TIE
    changed = True
    while changed:  # a cascade explains a box by an explained box of the other side: repeat to a fixed point
        changed = False
        for side, (mine, (scores, labels), (other_scores, other_labels), _, overlap) in enumerate(sides):
            links = np.array(sorted(explained[1 - side]), dtype=np.int64)
            for d in mine:
                if int(d) in explained[side] or links.size == 0:
                    continue
                suppressors = (
                    (other_labels[links] == labels[d])
                    & (overlap[d, links] >= nms_iou - NMS_IOU_MARGIN)
                    & (other_scores[links] >= scores[d] - margin)
                )
                if suppressors.any():
                    explained[side][int(d)] = CASCADE
                    changed = True
    if got_last is not None:
        places = len(explained[1]) - len(explained[0])  # boxes it kept beyond the one each took the place of
        for d in sorted(only_ref, key=lambda d: ref[0][d]):  # the last reference boxes go first
            if places > 0 and int(d) not in explained[0] and ref[0][d] <= got_last + margin:
                explained[0][int(d)] = CASCADE
                places -= 1
    return explained[0]


# --- finding the sites in a graph ---------------------------------------------------------------


def name_decision_nodes(model: onnx.ModelProto, decision_paths: set[str]) -> None:
    """Name each ``Sign`` and ``PRelu`` node after the module that computed it (from the exporter's name
    scopes), so a check can pair it with that module long after graph passes dropped the scopes: a
    Sign with its ``ThresholdSign``, a PRelu fused into a 1-bit layer with the ``nn.PReLU`` whose
    slopes the reference then applies."""
    calls: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        if node.op_type not in NAMED_OPS:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        paths = [str(s).removeprefix(EXPORT_PREFIX) for s in scopes if str(s).startswith(EXPORT_PREFIX)]
        named = [p for p in paths if p in decision_paths]
        if named:  # a module called once per pyramid level: node names must stay unique
            calls[named[-1]] += 1
            node.name = named[-1] if calls[named[-1]] == 1 else f"{named[-1]}{CALL_SEPARATOR}{calls[named[-1]] - 1}"


def module_of(node_name: str) -> str:
    """The module path a node was named after (without the call count of a repeated call)."""
    return node_name.partition(CALL_SEPARATOR)[0]


def decision_sites(model: onnx.ModelProto) -> list[DecisionSite]:
    """Every hard decision of an export: Sign nodes and 1-bit layers (either export mode)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    initializers = {init.name: init for init in model.graph.initializer}
    sites = []
    for node in model.graph.node:
        if node.op_type == "Sign" and node.domain in ("", "ai.onnx"):
            path = "" if node.name.startswith(EXPORTER_NODE_PREFIX) else module_of(node.name)  # unnamed: older file
            sites.append(DecisionSite("threshold", path, node.input[0], node.output[0]))
        elif is_binary_conv(node):
            x = _before_channel_threshold(node.input[0], producer, initializers)
            path = _module_path(node.input[1], ".w_packed")
            sites.append(DecisionSite("1-bit input", path, x, node.output[0], *_epilogue(node, initializers)))
        elif node.op_type == "Conv" and node.input[1] in producer:
            dq = producer[node.input[1]]
            if dq.op_type != "DequantizeLinear" or not dq.input[0].endswith(".weight_sign_int8"):
                continue
            path = _module_path(dq.input[0], ".weight_sign_int8")
            x = _pre_sign_input(node.input[0], producer)
            sites.append(DecisionSite("1-bit input", path, x, _scaled_output(node, consumers, initializers)))
    return sites


def _epilogue(
    node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]
) -> tuple[str, str, tuple[float, ...], str]:
    """(residual tensor or "", activation, slopes, their module) of a version-2 node; version 1 has none."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    activation = attrs.get("activation", b"none")
    activation = activation.decode() if isinstance(activation, bytes) else str(activation)
    residual = node.input[4] if len(node.input) > 4 and node.input[4] not in initializers else ""
    slope = initializers.get(node.input[5]) if len(node.input) > 5 else None
    values = tuple(float(v) for v in numpy_helper.to_array(slope).reshape(-1)) if slope is not None else ()
    module = slope.name.removeprefix(EXPORT_PREFIX) if slope is not None else ""
    return residual, activation, values, module.removesuffix(SLOPE_SUFFIX) if module.endswith(SLOPE_SUFFIX) else ""


def _module_path(initializer: str, suffix: str) -> str:
    return initializer.removeprefix(EXPORT_PREFIX).removesuffix(suffix)


def _before_channel_threshold(tensor: str, producer: dict[str, onnx.NodeProto], initializers: Container[str]) -> str:
    """A learned per-channel threshold stays a ``Sub`` in front of the op: the layer's input is above it."""
    node = producer.get(tensor)
    if node is not None and node.op_type == "Sub" and node.input[1] in initializers:
        if node.input[1].endswith(".channel_threshold"):
            return node.input[0]
    return tensor


def _pre_sign_input(tensor: str, producer: dict[str, onnx.NodeProto]) -> str:
    """Walk up from a decomposed conv's data input to the tensor its sign compares."""
    frontier = [tensor]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.op_type not in BINARIZE_OPS:
            continue
        if node.op_type in SIGN_OPS:
            return node.input[0]
        frontier.extend(node.input[:1] if node.op_type in ("Pad", "Not", "Cast") else node.input)
    raise ValueError(f"no sign found above {tensor}")


def _scaled_output(
    conv: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], initializers: Container[str]
) -> str:
    """The conv's output after ``* alpha`` and, if present, ``+ bias`` (both constants)."""
    out = conv.output[0]
    for op in ("Mul", "Add"):
        nxt = [n for n in consumers[out] if n.op_type == op and any(i in initializers for i in n.input if i != out)]
        if len(consumers[out]) != 1 or not nxt:
            break
        out = nxt[0].output[0]
    return out
