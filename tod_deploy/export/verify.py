"""Parity: does the exported graph compute what PyTorch computes?

Two levels, as Polygraphy and detection users check them:
- raw head outputs, element by element: an element fails only when its error exceeds both
  ``atol`` and ``rtol * |reference|``;
- detections: each reference detection (clear of the top-K/threshold boundary, where ties may
  legitimately swap) must have a candidate with the same label, IoU above ``min_iou`` and a
  score within ``score_tol``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from tod_deploy.export.passes import expose_tensors
from tod_deploy.export.teacher_forcing import binary_sites, forced_inputs
from tod_deploy.methods.base import DeployModel
from tod_deploy.nn.binary import BinaryConv2d
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
from tod_deploy.recipes import Recipe
from tod_deploy.runtimes import OnnxRuntimeRunner, TorchRunner

BOUNDARY_MARGIN = 1e-4  # scores this close to the K-th score or the threshold may swap in or out


@dataclass
class OutputParity:
    name: str
    max_abs: float
    max_rel: float
    failing: int
    total: int
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.failing == 0


@dataclass
class DetectionAgreement:
    reference: int = 0
    checked: int = 0
    matched: int = 0
    count_diff: int = 0
    min_iou: float = 1.0
    max_score_diff: float = 0.0
    min_iou_required: float = 0.99
    score_tol: float = 1e-3
    near_ties: int = 0  # unmatched because NMS met two overlapping boxes with (nearly) equal scores

    @property
    def ok(self) -> bool:
        # Near-ties are excused only while they stay rare (<= 1%): many of them mean a real error.
        excused = self.near_ties <= max(1, self.checked // 100)
        return (
            excused
            and self.matched + self.near_ties == self.checked
            and self.count_diff <= max(1, self.reference // 100)
        )


@dataclass
class VerificationReport:
    backend: str
    inputs: int
    outputs: list[OutputParity] = field(default_factory=list)
    detections: DetectionAgreement | None = None
    teacher_forced_layers: int = 0  # 1-bit layers checked one by one (see teacher_forcing.py)
    reference: str = "torch"  # what the backend was compared against (onnxruntime for engines)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs) and (self.detections is None or self.detections.ok)

    def failure(self) -> str:
        for o in self.outputs:
            if not o.ok:
                return (
                    f"output {o.name}: {o.failing} of {o.total} elements exceed atol {o.atol:g} and rtol {o.rtol:g} "
                    f"(max abs error {o.max_abs:.3g}, max rel error {o.max_rel:.3g})"
                )
        d = self.detections
        if d is not None and not d.ok:
            return (
                f"detections: {d.matched} of {d.checked} matched, {d.near_ties} NMS near-ties "
                f"(IoU >= {d.min_iou_required}, score within "
                f"{d.score_tol:g}), min IoU {d.min_iou:.4f}, max score diff {d.max_score_diff:.3g}, "
                f"count differs by {d.count_diff}"
            )
        return ""

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["ok"] = self.ok
        for entry, parity in zip(out["outputs"], self.outputs, strict=True):
            entry["ok"] = parity.ok
        if self.detections is not None:
            out["detections"]["ok"] = self.detections.ok
        return out


def verification_images(recipe: Recipe, batch: int, seed: int) -> np.ndarray:
    """Seeded inputs of two kinds: pixel noise, and smooth blobs that look more like images."""
    gen = torch.Generator().manual_seed(seed)
    h, w = recipe.input_size
    if seed % 2 == 0:
        x = torch.rand(batch, 3, h, w, generator=gen) * 255
    else:
        coarse = torch.rand(batch, 3, max(h // 32, 2), max(w // 32, 2), generator=gen)
        x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
        x = x.clamp(0, 1) * 255
    return x.numpy().astype(np.float32)


# A coordinate computed from values up to the image extent E (anchor centre +- half its size, clipped)
# is exact to a few float32 rounding steps of E: 16 ulps (16 * 2**-23 * E, 4.9e-4 px at 256, 2.3e-3 at
# 1216), whatever the coordinate itself is; seen: 1.5e-4 px at 256, 3.1e-4 px at 1216 (CFINet).
PIXEL_ULPS = 16


def pixel_atol(atol: float, input_size: tuple[int, int]) -> float:
    """The absolute tolerance of an output in input pixels (see PIXEL_ULPS)."""
    return max(atol, PIXEL_ULPS * float(np.finfo(np.float32).eps) * max(input_size))


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> OutputParity:
    if ref.shape != got.shape:
        return OutputParity(name, float("inf"), float("inf"), ref.size, ref.size, atol, rtol)
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    err = np.abs(ref64 - got64)
    rel = err / np.maximum(np.abs(ref64), 1e-12)
    failing = int(np.count_nonzero((err > atol) & (err > rtol * np.abs(ref64)) | ~np.isfinite(got64)))
    return OutputParity(name, float(err.max(initial=0.0)), float(rel.max(initial=0.0)), failing, ref.size, atol, rtol)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / np.maximum(union, 1e-12)
    # Degenerate (zero-area) boxes have no IoU; count them as overlapping exactly when they coincide.
    same = np.all(np.abs(a[:, None, :] - b[None, :, :]) <= 1e-3, axis=2)
    return np.where(union <= 1e-12, same.astype(iou.dtype), iou)


def agree_detections(
    ref: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    threshold: float,
    into: DetectionAgreement,
    nms_iou: float | None = None,
) -> None:
    """Match each reference detection to the candidate's; see the module docstring.

    With NMS in the graph, a box whose score is within ``BOUNDARY_MARGIN`` of an overlapping
    same-class box (IoU at least ``nms_iou``) may legitimately be the one suppressed in either
    runtime: such an unmatched box counts as a near-tie, not as a mismatch.
    """
    for i in range(ref["num_dets"].shape[0]):
        n_ref, n_got = int(ref["num_dets"][i]), int(got["num_dets"][i])
        into.reference += n_ref
        into.count_diff = max(into.count_diff, abs(n_ref - n_got))
        if n_ref == 0:
            continue
        boxes_r, scores_r, labels_r = ref["boxes"][i, :n_ref], ref["scores"][i, :n_ref], ref["labels"][i, :n_ref]
        boxes_g, scores_g, labels_g = got["boxes"][i, :n_got], got["scores"][i, :n_got], got["labels"][i, :n_got]
        floor = max(float(scores_r[-1]), threshold) + BOUNDARY_MARGIN
        iou = box_iou(boxes_r, boxes_g) if n_got else np.zeros((n_ref, 0))
        for j in np.flatnonzero(scores_r > floor):
            into.checked += 1
            same = np.flatnonzero(labels_g == labels_r[j])
            if same.size == 0:
                into.min_iou = 0.0
                continue
            k = same[np.argmax(iou[j, same])]
            diff = abs(float(scores_r[j]) - float(scores_g[k]))
            if iou[j, k] >= into.min_iou_required and diff <= into.score_tol:
                into.matched += 1
            elif nms_iou is not None and _near_tie(iou[j, same], scores_g[same], float(scores_r[j]), nms_iou):
                into.near_ties += 1
                continue
            into.min_iou = min(into.min_iou, float(iou[j, k]))
            into.max_score_diff = max(into.max_score_diff, diff)


def _near_tie(ious: np.ndarray, scores: np.ndarray, score: float, nms_iou: float) -> bool:
    return bool(np.any((ious >= nms_iou - 0.01) & (np.abs(scores - score) <= BOUNDARY_MARGIN)))


def verify_onnx(
    model: onnx.ModelProto,
    deploy: DeployModel,
    recipe: Recipe,
    seeds: tuple[int, ...] = (0, 1, 2),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    threads: int | None = None,
) -> VerificationReport:
    """Run onnxruntime (CPU) and PyTorch on the same seeded inputs and compare."""
    graph_outputs = [o.name for o in model.graph.output]
    has_contract = all(name in graph_outputs for name in CONTRACT_OUTPUTS)
    raw = list(deploy.parity_names)
    names = [*CONTRACT_OUTPUTS, *raw] if has_contract else raw
    sites = binary_sites(model) if any(isinstance(m, BinaryConv2d) for m in deploy.modules()) else []
    site_tensors = list(dict.fromkeys(t for site in sites for t in (site.x, site.y)))
    ort_runner = OnnxRuntimeRunner(expose_tensors(model, [*names, *site_tensors]), threads)
    torch_runner = TorchRunner(deploy, names, threads)
    batch = 2 if recipe.batch == "dynamic" else int(recipe.batch)
    report = VerificationReport(backend="onnxruntime", inputs=len(seeds) * batch, teacher_forced_layers=len(sites))
    worst: dict[str, OutputParity] = {}
    agreement = DetectionAgreement() if has_contract else None
    for seed in seeds:
        images = verification_images(recipe, batch, seed)
        got = ort_runner.run(images)
        forced: dict[str, torch.Tensor] = {}
        with forced_inputs(deploy, sites, got, forced):
            ref = torch_runner.run(images)
        if sites:
            ref = {**ref, **{name: value.numpy() for name, value in forced.items()}}
            ref["binary layers"] = np.concatenate([ref[s.y].ravel() for s in sites])
            got = {**got, "binary layers": np.concatenate([got[s.y].ravel() for s in sites])}
        for name in raw + (["binary layers"] if sites else []):
            name_atol = pixel_atol(atol, recipe.input_size) if name in deploy.pixel_outputs else atol
            parity = compare_arrays(name, ref[name], got[name], name_atol, rtol)
            prev = worst.get(name)
            if prev is None:
                worst[name] = parity
            else:
                prev.max_abs, prev.max_rel = max(prev.max_abs, parity.max_abs), max(prev.max_rel, parity.max_rel)
                prev.failing += parity.failing
                prev.total += parity.total
        if agreement is not None:
            threshold = recipe.score_threshold if deploy.final_score_threshold is None else deploy.final_score_threshold
            agree_detections(ref, got, threshold, agreement, deploy.nms_iou)
    report.outputs = [worst[name] for name in raw + (["binary layers"] if sites else [])]
    report.detections = agreement
    return report
