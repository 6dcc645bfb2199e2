"""COCO-style AP with the AI-TOD size bins, computed by pycocotools' COCOeval.

One COCOeval run covers every area range at once: "all", the four AI-TOD bins on sqrt(area)
(very tiny [2, 8), tiny [8, 16), small [16, 32), medium [32, 64) px, i.e. areas 4-64, 64-256,
256-1024, 1024-4096) and COCO's own small/medium/large, so the same detections give both the
tiny-object table and numbers directly comparable with ``COCOeval.summarize()``.

``evaluate_detections`` takes any ground truth, including another model's detections turned
into ground truth by ``detections_as_ground_truth`` (deployment fidelity: FP16/INT8 vs FP32).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tod_deploy.errors import UserError

# AI-TOD bins on sqrt(area), in pixels: [lo, hi).
AITOD_BINS: dict[str, tuple[float, float]] = {"vt": (2.0, 8.0), "t": (8.0, 16.0), "s": (16.0, 32.0), "m": (32.0, 64.0)}
COCO_AREAS: dict[str, tuple[float, float]] = {
    "coco_small": (0.0, 32.0**2),
    "coco_medium": (32.0**2, 96.0**2),
    "coco_large": (96.0**2, 1e5**2),
}
ALL_AREAS = (0.0, 1e5**2)
# The table's columns, in order (AI-TOD's reporting order).
TABLE_METRICS = ("AP", "AP50", "AP75", "APvt", "APt", "APs", "APm")


def size_bin(side: float) -> str:
    """The AI-TOD bin of an object whose sqrt(area) is ``side`` ('vt' below 8 px, 'm' from 32 px up)."""
    for name, (_lo, hi) in AITOD_BINS.items():
        if side < hi:
            return name
    return "m"


def area_ranges() -> dict[str, tuple[float, float]]:
    """Every area range evaluated, as pycocotools' areaRng [min, max] on area (= side**2)."""
    ranges = {"all": ALL_AREAS}
    ranges.update({name: (lo**2, hi**2) for name, (lo, hi) in AITOD_BINS.items()})
    ranges.update(COCO_AREAS)
    return ranges


@contextlib.contextmanager
def _quiet() -> Any:
    """pycocotools prints progress to stdout; keep the CLI's stdout for its table."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def as_coco(ground_truth: Any) -> Any:
    """A pycocotools COCO object from a COCO dict (or the object itself)."""
    from pycocotools.coco import COCO

    if isinstance(ground_truth, COCO):
        return ground_truth
    if not isinstance(ground_truth, Mapping):
        raise TypeError(f"ground truth must be a COCO dict or pycocotools COCO, not {type(ground_truth).__name__}")
    coco = COCO()
    data = dict(ground_truth)
    data["annotations"] = [
        {**a, "area": a.get("area", float(a["bbox"][2] * a["bbox"][3])), "iscrowd": a.get("iscrowd", 0),
         "id": a.get("id", i + 1)}
        for i, a in enumerate(ground_truth.get("annotations", []))
    ]  # fmt: skip
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


def _results(gt: Any, detections: Iterable[Mapping[str, Any]], class_agnostic: bool) -> Any:
    """Detections ({image_id, category_id, bbox xywh, score}) as a COCO results object (like ``loadRes``)."""
    from pycocotools.coco import COCO

    image_ids = set(gt.getImgIds())
    category_ids = set(gt.getCatIds())
    fallback = min(category_ids) if category_ids else 1
    annotations = []
    for i, det in enumerate(detections):
        x, y, w, h = (float(v) for v in det["bbox"])
        score = float(det["score"])
        if not all(math.isfinite(v) for v in (x, y, w, h, score)):
            raise UserError(
                f"detection {i} has non-finite values (bbox {det['bbox']}, score {det['score']})",
                "the model produced NaN/Inf; check its export with tod-deploy verify",
            )
        if det["image_id"] not in image_ids:
            raise ValueError(f"detection {i} refers to image_id {det['image_id']!r}, absent from the ground truth")
        category = fallback if class_agnostic else det["category_id"]
        if category not in category_ids:
            raise ValueError(f"detection {i} has category_id {category!r}, absent from the ground truth")
        annotations.append(
            {"id": i + 1, "image_id": det["image_id"], "category_id": category, "bbox": [x, y, w, h],
             "area": w * h, "score": score, "iscrowd": 0}
        )  # fmt: skip
    results = COCO()
    results.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"])}
    results.dataset["annotations"] = annotations
    with _quiet():
        results.createIndex()
    return results


def _mean_valid(values: np.ndarray) -> float | None:
    """COCOeval's summary mean: entries of -1 (no ground truth) are left out; None when nothing is left."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def evaluate_detections(
    coco_gt: Any,
    detections: Sequence[Mapping[str, Any]],
    class_agnostic: bool = False,
    max_dets: int = 100,
) -> dict[str, Any]:
    """AP, AP50, AP75, the AI-TOD bins (APvt, APt, APs, APm), COCO's coco_APs/m/l, AR and AR50, as a dict.

    ``coco_gt``: a COCO dict or pycocotools COCO (e.g. ``detections_as_ground_truth(...)``);
    ``detections``: [{image_id, category_id, bbox [x, y, w, h], score}, ...] in original pixels.
    ``class_agnostic`` ignores categories on both sides (COCOeval ``useCats = 0``). Metrics are in
    0..1, or None where the ground truth has no object in that range (pycocotools' -1).
    """
    from pycocotools.cocoeval import COCOeval

    if max_dets < 1:
        raise UserError(f"max detections per image must be at least 1, got {max_dets}", "use e.g. --max-dets 100")
    gt = as_coco(coco_gt)
    results = _results(gt, detections, class_agnostic)
    ranges = area_ranges()
    evaluator = COCOeval(gt, results, "bbox")
    evaluator.params.areaRng = [list(r) for r in ranges.values()]
    evaluator.params.areaRngLbl = list(ranges)
    evaluator.params.maxDets = [max_dets]
    evaluator.params.useCats = 0 if class_agnostic else 1
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"]  # [T iou, R recall, K cat, A area, M maxdets]
    recall = evaluator.eval["recall"]  # [T, K, A, M]
    iou = evaluator.params.iouThrs
    t50, t75 = int(np.argmin(np.abs(iou - 0.5))), int(np.argmin(np.abs(iou - 0.75)))
    index = {name: a for a, name in enumerate(ranges)}
    metrics: dict[str, Any] = {
        "AP": _mean_valid(precision[:, :, :, index["all"], -1]),
        "AP50": _mean_valid(precision[t50, :, :, index["all"], -1]),
        "AP75": _mean_valid(precision[t75, :, :, index["all"], -1]),
    }
    for name in AITOD_BINS:
        metrics[f"AP{name}"] = _mean_valid(precision[:, :, :, index[name], -1])
    for name in COCO_AREAS:
        metrics[f"coco_AP{name.split('_')[1][0]}"] = _mean_valid(precision[:, :, :, index[name], -1])
    metrics["AR"] = _mean_valid(recall[:, :, index["all"], -1])
    # AR50: the share of ground-truth boxes some detection (any score) overlaps at IoU >= 0.5. Against a
    # reference model's detections it separates boxes a precision change lost from ones it only re-ranked.
    metrics["AR50"] = _mean_valid(recall[t50, :, index["all"], -1])
    for name in AITOD_BINS:
        metrics[f"AR{name}"] = _mean_valid(recall[:, :, index[name], -1])
    sides = [math.sqrt(max(a["area"], 0.0)) for a in gt.dataset["annotations"] if not a.get("iscrowd", 0)]
    metrics["counts"] = {
        "images": len(gt.getImgIds()),
        "ground_truth": len(sides),
        "detections": len(results.dataset["annotations"]),
        "ground_truth_per_bin": {name: sum(1 for s in sides if lo <= s < hi) for name, (lo, hi) in AITOD_BINS.items()},
    }
    metrics["settings"] = {"max_dets": max_dets, "class_agnostic": class_agnostic, "area_ranges": ranges}
    return metrics


def detections_as_ground_truth(
    reference: Any, detections: Iterable[Mapping[str, Any]], min_score: float = 0.0
) -> dict[str, Any]:
    """A COCO ground-truth dict made of a model's detections (score >= ``min_score``) on ``reference``'s images.

    For deployment fidelity: ``evaluate_detections(detections_as_ground_truth(gt, fp32_dets, 0.3), int8_dets)``
    scores how well a lower-precision model reproduces the FP32 model, whatever the real labels are.
    """
    ref = as_coco(reference)
    annotations = []
    for det in detections:
        if float(det["score"]) < min_score:
            continue
        x, y, w, h = (float(v) for v in det["bbox"])
        annotations.append(
            {"id": len(annotations) + 1, "image_id": det["image_id"], "category_id": det["category_id"],
             "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
        )  # fmt: skip
    return {
        "info": {"description": f"detections as ground truth (score >= {min_score:g})"},
        "images": list(ref.dataset["images"]),
        "categories": list(ref.dataset["categories"]),
        "annotations": annotations,
    }


def crossed_the_cut(
    reference: Iterable[Mapping[str, Any]],
    detections: Iterable[Mapping[str, Any]],
    min_score: float,
    class_agnostic: bool = False,
    iou: float = 0.5,
) -> int:
    """How many of ``detections`` at score >= ``min_score`` lie on a ``reference`` box scored under it.

    Fidelity takes the reference's boxes at or above the cut as ground truth and ranks every detection of
    the row, so score noise costs AP50 both ways: a box the reference scored 0.28 that the row scores 0.32
    is a false positive ranked among the true ones, and a reference box the row scores under the cut is
    found ("found" takes any score) but ranked among the row's low-score boxes. Called both ways round, this
    counts the two moves, apart from boxes the reference does not have at all: a box counts when no box of
    the other side at or above the cut overlaps it at IoU >= ``iou`` and one under the cut does (same
    category unless ``class_agnostic``). IoU is pycocotools' (``mask.iou``), as COCOeval matches boxes.
    """
    from pycocotools import mask

    def by_key(dets: Iterable[Mapping[str, Any]]) -> dict[Any, list[Mapping[str, Any]]]:
        grouped: dict[Any, list[Mapping[str, Any]]] = {}
        for det in dets:
            grouped.setdefault((det["image_id"], None if class_agnostic else det["category_id"]), []).append(det)
        return grouped

    def boxes(dets: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return np.array([[float(v) for v in d["bbox"]] for d in dets], dtype=np.float64).reshape(-1, 4)

    def overlapped(candidates: np.ndarray, refs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if not refs:
            return np.zeros(len(candidates), dtype=bool)
        return np.asarray(mask.iou(candidates, boxes(refs), [0] * len(refs))).max(axis=1) >= iou

    ref = by_key(reference)
    crossed = 0
    for key, dets in by_key(d for d in detections if float(d["score"]) >= min_score).items():
        above = [d for d in ref.get(key, []) if float(d["score"]) >= min_score]
        under = [d for d in ref.get(key, []) if float(d["score"]) < min_score]
        candidates = boxes(dets)
        crossed += int((~overlapped(candidates, above) & overlapped(candidates, under)).sum())
    return crossed


def category_lookup(
    num_classes: int | None,
    categories: Sequence[Mapping[str, Any]],
    class_agnostic: bool,
    class_names: Sequence[str] = (),
) -> Any:
    """A function label -> category id (or None to drop), from a model's contiguous labels 0..C-1.

    * ``class_agnostic``: every label -> the data set's first category (and evaluation ignores categories);
    * the model's class names known and some equal to category names: label i -> the category named
      like class i (by name, whatever the order or subset); classes no category is named like are dropped;
    * C equal to the number of categories: label i -> the i-th category by ascending id;
    * a 91-class COCO model (DETR layout, label = COCO category id) on a data set whose ids are
      within 1..90: label -> the same id; labels that are no category are dropped.
    Anything else cannot be mapped and is a UserError.
    """
    ids = sorted(int(c["id"]) for c in categories)
    if class_agnostic:
        return lambda _label: ids[0]
    by_name = {str(c.get("name")): int(c["id"]) for c in categories if c.get("name") is not None}
    if class_names and by_name:
        mapped = [by_name.get(name) for name in class_names]
        if not any(i is not None for i in mapped):
            raise UserError(
                f"none of the model's classes ({', '.join(class_names[:4])}, ...) is a category of the data set "
                f"({', '.join(list(by_name)[:4])}, ...)",
                "evaluate on data of the classes the model was trained on, or pass --class-agnostic",
            )
        return lambda label: mapped[label] if 0 <= label < len(mapped) else None
    if num_classes is None:
        raise UserError(
            "the model's number of classes is unknown, so its labels cannot be mapped to the data set's categories",
            "pass --class-agnostic",
        )
    if num_classes == len(ids):
        return lambda label: ids[label] if 0 <= label < len(ids) else None
    if num_classes == 91 and len(ids) > 1 and all(1 <= i <= 90 for i in ids):
        valid = set(ids)
        return lambda label: label if label in valid else None
    raise UserError(
        f"the model has {num_classes} classes but the data set has {len(ids)} categories (ids {ids[:5]}"
        f"{', ...' if len(ids) > 5 else ''}), so its labels cannot be mapped",
        "pass --class-agnostic to score boxes regardless of class, or evaluate a model trained on these categories",
    )
