"""Tiny-object AP: agreement with pycocotools' own COCOeval, the AI-TOD bins, the box mapping, the CLI."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_cli import assert_one_line_error

from tod_deploy.errors import UserError
from tod_deploy.evaluation.coco_eval import (
    AITOD_BINS,
    TABLE_METRICS,
    category_lookup,
    crossed_the_cut,
    detections_as_ground_truth,
    evaluate_detections,
)
from tod_deploy.evaluation.datasets import load_coco, load_image
from tod_deploy.evaluation.gate import check_floors
from tod_deploy.evaluation.run import compare_runners, evaluate_model, score_fidelity
from tod_deploy.evaluation.synthetic import generate_synthetic

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval_set")
    generate_synthetic(root, images=16, seed=11, size_hw=(256, 256))
    return root


@pytest.fixture(scope="module")
def two_class_gt(synthetic: Path) -> dict[str, Any]:
    """The synthetic set with its objects split over two categories (so categories matter)."""
    data = json.loads((synthetic / "annotations.json").read_text())
    data["categories"] = [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}]
    for ann in data["annotations"]:
        ann["category_id"] = 3 if ann["id"] % 2 else 7
    return data


def jittered(gt: dict[str, Any], seed: int = 0, keep: float = 0.85, jitter: float = 0.15) -> list[dict[str, Any]]:
    """Detections from perturbed ground-truth boxes (size-relative jitter), random scores, some misses,
    some wrong classes and some false positives: AP is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    ids = [c["id"] for c in gt["categories"]]
    dets = []
    for ann in gt["annotations"]:
        if rng.random() > keep:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy, dw, dh = rng.normal(0, jitter, 4) * [w, h, w, h]
        category = ann["category_id"] if rng.random() < 0.9 else ids[int(rng.integers(len(ids)))]
        box = [x + dx, y + dy, max(0.5, w + dw), max(0.5, h + dh)]
        dets.append({"image_id": ann["image_id"], "category_id": category, "bbox": box, "score": float(rng.random())})
    for im in gt["images"]:  # false positives of every size
        for _ in range(3):
            side = float(np.exp(rng.uniform(np.log(2), np.log(64))))
            box = [float(rng.uniform(0, 190)), float(rng.uniform(0, 190)), side, side]
            category = ids[int(rng.integers(len(ids)))]
            dets.append({"image_id": im["id"], "category_id": category, "bbox": box, "score": float(rng.random())})
    return dets


def cocoeval_stats(gt: dict[str, Any], dets: list[dict[str, Any]], tmp: Path, area_rng: list | None = None) -> Any:
    """pycocotools used the documented way: COCO(file), loadRes, evaluate, accumulate, summarize."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = tmp / "gt.json"
    path.write_text(json.dumps(gt))
    coco = COCO(str(path))
    evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
    if area_rng is not None:
        evaluator.params.areaRng = area_rng
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def same(mine: float | None, theirs: float) -> bool:
    return (theirs == -1 and mine is None) or (mine is not None and math.isclose(mine, theirs, abs_tol=1e-12))


# ----------------------------------------------------------------------------- AP against pycocotools


def test_standard_areas_agree_with_cocoeval(two_class_gt: dict[str, Any], tmp_path: Path) -> None:
    dets = jittered(two_class_gt)
    ours = evaluate_detections(two_class_gt, dets)
    stats = cocoeval_stats(two_class_gt, dets, tmp_path)
    assert 0.05 < ours["AP"] < 0.9 and 0.1 < ours["AP50"] < 0.99  # a data set where AP says something
    for key, index in (("AP", 0), ("AP50", 1), ("AP75", 2), ("coco_APs", 3), ("coco_APm", 4), ("coco_APl", 5)):
        assert same(ours[key], stats[index]), (key, ours[key], stats[index])
    assert same(ours["AR"], stats[8])  # AR@100, all areas
    assert ours["coco_APs"] is not None and ours["coco_APm"] is not None


def test_aitod_bins_agree_with_cocoeval_areas_set_by_hand(two_class_gt: dict[str, Any], tmp_path: Path) -> None:
    dets = jittered(two_class_gt, seed=1)
    ours = evaluate_detections(two_class_gt, dets)
    everything = [0, 1e5**2]
    # summarize() reports areaRng[1..3] as "small/medium/large": put the bins there, by hand.
    first = cocoeval_stats(two_class_gt, dets, tmp_path, [everything, [4, 64], [64, 256], [256, 1024]])
    second = cocoeval_stats(two_class_gt, dets, tmp_path, [everything, [1024, 4096], [0, 1], [0, 1]])
    expected = {"APvt": first[3], "APt": first[4], "APs": first[5], "APm": second[3]}
    for key, value in expected.items():
        assert value > 0 and same(ours[key], value), (key, ours[key], value)
    assert len({round(v, 6) for v in expected.values()}) == 4  # the bins are different numbers
    assert ours["counts"]["ground_truth_per_bin"] == {
        name: sum(lo <= math.sqrt(a["area"]) < hi for a in two_class_gt["annotations"])
        for name, (lo, hi) in AITOD_BINS.items()
    }


def test_each_bin_scores_only_its_own_objects(two_class_gt: dict[str, Any]) -> None:
    """Dropping the detections of very tiny objects zeroes APvt and leaves APm exactly as it was."""
    gt_side = {a["id"]: math.sqrt(a["area"]) for a in two_class_gt["annotations"]}
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5 + a["id"] * 1e-6}
        for a in two_class_gt["annotations"]
    ]
    full = evaluate_detections(two_class_gt, perfect)
    assert all(full[m] == pytest.approx(1.0) for m in TABLE_METRICS)
    without_vt = [d for d, a in zip(perfect, two_class_gt["annotations"], strict=True) if gt_side[a["id"]] >= 8]
    partial = evaluate_detections(two_class_gt, without_vt)
    assert partial["APvt"] == 0.0
    assert partial["APm"] == pytest.approx(1.0) and partial["APs"] == pytest.approx(1.0)
    assert 0.0 < partial["AP"] < 1.0


def test_class_agnostic_ignores_labels(two_class_gt: dict[str, Any]) -> None:
    dets = [
        {"image_id": a["image_id"], "category_id": 10 - a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in two_class_gt["annotations"]
    ]  # every box right, every class wrong (3 <-> 7)
    assert evaluate_detections(two_class_gt, dets)["AP"] == 0.0
    assert evaluate_detections(two_class_gt, dets, class_agnostic=True)["AP"] == pytest.approx(1.0)


def test_detections_as_ground_truth_for_fidelity(two_class_gt: dict[str, Any]) -> None:
    reference = jittered(two_class_gt, seed=2)
    gt = detections_as_ground_truth(two_class_gt, reference, min_score=0.3)
    assert len(gt["annotations"]) == sum(d["score"] >= 0.3 for d in reference)
    assert gt["images"] == two_class_gt["images"]
    identical = evaluate_detections(gt, reference)
    assert identical["AP"] == pytest.approx(1.0) and identical["AP50"] == pytest.approx(1.0)
    drifted = evaluate_detections(gt, jittered(gt, seed=3, keep=1.0, jitter=0.1))
    assert drifted["AP"] < 0.9 * identical["AP"]


def test_fidelity_found_counts_lost_boxes_not_reranked_ones(two_class_gt: dict[str, Any]) -> None:
    """AR50 ("found") is the share of reference boxes detected at IoU >= 0.5 whatever the score: dropping k
    of n boxes gives (n - k) / n exactly; shuffling the scores lowers AP50 and leaves AR50 at 1."""
    reference = [d for d in jittered(two_class_gt, seed=2) if d["score"] >= 0.3]
    gt = detections_as_ground_truth(two_class_gt, reference, min_score=0.3)
    n = len(gt["annotations"])
    assert evaluate_detections(gt, reference)["AR50"] == pytest.approx(1.0)
    lost = evaluate_detections(gt, reference[7:], class_agnostic=True)  # one pool: no per-category mean
    assert lost["AR50"] == pytest.approx((n - 7) / n)
    rng = np.random.default_rng(4)
    false_alarms = [{**d, "bbox": [d["bbox"][0] + 3 * d["bbox"][2], *d["bbox"][1:]]} for d in reference]
    shuffled = [{**d, "score": float(rng.random())} for d in [*reference, *false_alarms]]
    reranked = evaluate_detections(gt, shuffled)
    assert reranked["AR50"] == pytest.approx(1.0) and reranked["AP50"] < 0.9


def test_crossed_counts_scores_moved_across_the_cut_only() -> None:
    """A row box at or above the cut counts as crossed when it lies on a reference box under the cut and on
    none above it: boxes the reference also has above the cut, new boxes, boxes still under the cut, another
    image's or another class's box do not count; swapped, the call counts moves down. Expected counts are
    worked out by hand from the boxes."""

    def det(image: int, x: float, score: float, category: int = 1, side: float = 10.0) -> dict[str, Any]:
        return {"image_id": image, "category_id": category, "bbox": [x, 0.0, side, side], "score": score}

    reference = [
        det(1, 0, 0.9),  # above the cut
        det(1, 100, 0.2),  # under it
        det(1, 200, 0.1),  # under it
        det(2, 0, 0.25),  # under it, in image 2
        det(1, 400, 0.95),  # above the cut, and under it a duplicate the reference kept
        det(1, 401, 0.15),
        det(1, 500, 0.5),  # above the cut; the row scores it under
        det(1, 600, 0.7),  # above the cut; the row lost it
    ]
    row = [
        det(1, 1, 0.8),  # on the 0.9 box (IoU 9/11): agrees
        det(1, 101, 0.4),  # on the 0.2 box (IoU 9/11): crossed
        det(1, 205, 0.35),  # on the 0.1 box at IoU 5/15 = 0.33: a new box, not crossed
        det(1, 200, 0.25),  # on the 0.1 box but still under the cut
        det(1, 300, 0.7),  # nothing there in the reference
        det(2, 0, 0.5, category=2),  # on image 2's box, another class
        det(3, 100, 0.9),  # image 3: the reference found nothing
        det(1, 400, 0.6),  # on the 0.95 box and on its 0.15 duplicate: agrees
        det(1, 501, 0.1),  # the 0.5 box, under the cut
    ]
    assert crossed_the_cut(reference, row, 0.3) == 1
    assert crossed_the_cut(reference, row, 0.3, class_agnostic=True) == 2  # the class-2 box now counts
    # a 0.15 cut: the 0.2 box is above it (the 101 box agrees), and the 0.25 box on the 0.1 box crosses
    assert crossed_the_cut(reference, row, 0.15) == 1
    assert crossed_the_cut(reference, row, 0.3, iou=0.3) == 2  # the 205 box reaches the 0.1 box at IoU 0.33
    assert crossed_the_cut(reference, reference, 0.3) == 0  # a model against itself crosses nothing
    # the other way round: reference boxes the row scores under the cut only (the 500 box; the 600 box is lost)
    assert crossed_the_cut(row, reference, 0.3) == 1


def test_one_grey_level_moves_each_value_by_at_most_one() -> None:
    """The noise floor's change: every value moves by -1, 0 or +1 (about a third each), stays in 0..255 at the
    ends, keeps uint8, and the same seed makes the same change."""
    from tod_deploy.evaluation.run import one_grey_level

    rgb = np.random.default_rng(1).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    rgb[0], rgb[1] = 0, 255
    moved = one_grey_level(rgb, np.random.default_rng(0))
    step = moved.astype(int) - rgb.astype(int)
    assert moved.dtype == np.uint8 and moved.shape == rgb.shape and np.abs(step).max() == 1
    middle = step[2:]
    assert all(0.3 < np.mean(middle == k) < 0.37 for k in (-1, 0, 1))
    assert step[0].min() == 0 and step[1].max() == 0  # clipped, not wrapped around
    assert np.array_equal(moved, one_grey_level(rgb, np.random.default_rng(0)))


def test_empty_and_non_finite_detections(two_class_gt: dict[str, Any]) -> None:
    empty = evaluate_detections(two_class_gt, [])
    assert empty["AP"] == 0.0 and empty["APvt"] == 0.0 and empty["coco_APl"] is None
    bad = [{"image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, float("nan"), 4.0], "score": 0.5}]
    with pytest.raises(UserError, match="non-finite"):
        evaluate_detections(two_class_gt, bad)


def test_category_lookup() -> None:
    cats = [{"id": 7}, {"id": 3}]
    by_index = category_lookup(2, cats, class_agnostic=False)
    assert [by_index(0), by_index(1), by_index(2)] == [3, 7, None]
    assert category_lookup(91, cats, class_agnostic=True)(55) == 3
    coco_like = category_lookup(91, [{"id": 1}, {"id": 18}, {"id": 90}], class_agnostic=False)
    assert [coco_like(18), coco_like(12), coco_like(0)] == [18, None, None]
    with pytest.raises(UserError, match="8 classes but the data set has 1 categories.*--class-agnostic"):
        category_lookup(8, [{"id": 1}], class_agnostic=False)


# ----------------------------------------------------------------------------- images and boxes


def test_letterbox_maps_boxes_back_to_the_original(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.zeros((300, 500, 3), dtype=np.uint8)
    pixels[120:160, 200:260] = 255  # an object at x 200..260, y 120..160
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    tensor, mapping = load_image(tmp_path / "wide.png", (256, 384))
    assert tensor.shape == (3, 256, 384) and tensor.dtype == np.float32 and tensor.max() == 255
    assert tensor[:, 231:].max() == 0  # 300x500 -> 230x384, padded below
    ys, xs = np.nonzero(tensor[0] > 127)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
    assert np.abs(mapping.to_original(found) - [200, 120, 260, 160]).max() <= 1.5
    box = np.array([[10.0, 20.0, 400.0, 290.0]])
    assert np.allclose(mapping.to_original(mapping.to_input(box)), box)
    assert mapping.to_original(np.array([0.0, 0.0, 384.0, 256.0])).tolist() == [0, 0, 500, 300]  # clipped


def test_contract_to_detections() -> None:
    from tod_deploy.evaluation.datasets import Letterbox
    from tod_deploy.evaluation.run import contract_to_detections

    mapping = Letterbox(0.5, 0.5, 0, 0, (200, 400), (100, 200))
    outputs = {
        "num_dets": np.array([3], dtype=np.int32),
        "boxes": np.array([[[10, 10, 20, 30], [0, 0, 5, 5], [50, 60, 50, 70], [1, 1, 2, 2]]], dtype=np.float32),
        "scores": np.array([[0.9, 0.8, 0.7, 0.0]], dtype=np.float32),
        "labels": np.array([[1, 5, 0, 0]], dtype=np.int32),
    }
    dets = contract_to_detections(outputs, mapping, 42, lambda label: {0: 3, 1: 7}.get(label))
    # label 5 has no category; the third box has zero width; the fourth is padding past num_dets
    assert dets == [{"image_id": 42, "category_id": 7, "bbox": [20.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)}]
    outputs["scores"][0, 3] = np.nan
    with pytest.raises(UserError, match="NaN/Inf scores"):
        contract_to_detections(outputs, mapping, 42, lambda label: 3)


def test_load_coco_checks(synthetic: Path, tmp_path: Path) -> None:
    coco = load_coco(synthetic / "annotations.json", synthetic / "images", max_images=3)
    assert [im["id"] for im in coco.images] == [1, 2, 3]
    assert {a["image_id"] for a in coco.subset()["annotations"]} == {1, 2, 3}
    with pytest.raises(UserError, match="at least 1"):
        load_coco(synthetic / "annotations.json", synthetic / "images", max_images=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": [{"bbox": [0, 0, 1]}], "categories": [{"id": 1}]}))
    with pytest.raises(UserError, match=r"annotation 0 has no \[x, y, w, h\] bbox"):
        load_coco(bad, synthetic / "images")


# ----------------------------------------------------------------------------- report


def test_table_and_plot(tmp_path: Path) -> None:
    from PIL import Image
    from rich.console import Console

    from tod_deploy.evaluation.report import PALETTE, eval_table, write_plot
    from tod_deploy.evaluation.run import EvalReport

    metrics = {m: 0.1 * (i + 1) for i, m in enumerate(TABLE_METRICS)}
    counts = {"detections": 12, "ground_truth": 9, "ground_truth_per_bin": {"vt": 1, "t": 2, "s": 3, "m": 3}}
    results = {"torch": {**metrics, "counts": counts}, "onnxruntime": {**metrics, "APm": None, "counts": counts}}
    report = EvalReport("m.onnx", "thumbdet", (256, 384), "ann.json", "imgs", 4, True, 100, results, {"torch": 2.0})
    console = Console(width=200, record=True)
    console.print(eval_table(report))
    text = console.export_text()
    assert "torch" in text and "onnxruntime" in text and "APvt" in text and "70.0" in text and " - " in text
    path = write_plot(results, tmp_path / "plot.png", "title")
    with Image.open(path) as img:
        assert img.size == (960, 540)
        colors = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert PALETTE[0] in colors and PALETTE[1] in colors


# ----------------------------------------------------------------------------- the command, end to end


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tod_deploy.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_set")
    generate_synthetic(root, images=4, seed=5, size_hw=(240, 320))
    return root


def test_eval_end_to_end_torch_and_onnxruntime(small_onnx: Path, tiny_set: Path, tmp_path: Path) -> None:
    """The command over 4 images on both backends: JSON, PNG, equal AP. In-process, the same run gives the
    same detections on both backends, and with torch's detections as ground truth (random weights score
    0 on the real boxes) onnxruntime's reach AP near 1 - the fidelity scoring a quantized model gets."""
    from PIL import Image

    from tod_deploy.evaluation.run import evaluate_model

    ann = tiny_set / "annotations.json"
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    proc = run("eval", str(small_onnx), "--data", str(ann), "--images", str(tiny_set / "images"), "--class-agnostic",
               "--backend", "torch,onnxruntime", "--json", str(out_json), "--plot", str(out_png))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime" in proc.stdout and "APvt" in proc.stdout
    result = json.loads(out_json.read_text())
    assert result["images"] == 4 and set(result["results"]) == {"torch", "onnxruntime"}
    torch_m, ort_m = result["results"]["torch"], result["results"]["onnxruntime"]
    assert torch_m["counts"]["ground_truth"] == len(json.loads(ann.read_text())["annotations"])
    for metric in TABLE_METRICS:
        assert torch_m[metric] is not None and abs(torch_m[metric] - ort_m[metric]) < 1e-3, metric
    with Image.open(out_png) as img:
        assert img.format == "PNG" and img.size == (960, 540)

    report = evaluate_model(small_onnx, ann, tiny_set / "images", backends="torch,onnxruntime", class_agnostic=True,
                            max_images=2, log=lambda _line: None)  # fmt: skip
    torch_dets, ort_dets = report.detections["torch"], report.detections["onnxruntime"]
    assert len(torch_dets) == len(ort_dets) > 0
    for a, b in zip(torch_dets, ort_dets, strict=True):  # same order (the contract is sorted by score)
        assert a["image_id"] == b["image_id"] and abs(a["score"] - b["score"]) < 1e-3
        assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() < 0.05
    for x, y, w, h in (d["bbox"] for d in torch_dets):  # mapped back into the 320x240 originals
        assert 0 <= x and 0 <= y and x + w <= 320 + 1e-6 and y + h <= 240 + 1e-6
    assert max(x + w for x, _, w, _ in (d["bbox"] for d in torch_dets)) > 256  # not left in 256x384 input pixels
    scores = sorted(d["score"] for d in torch_dets)
    reference = detections_as_ground_truth(load_coco(ann, tiny_set / "images", 2).subset(), torch_dets, scores[-50])
    fidelity = evaluate_detections(reference, ort_dets, class_agnostic=True)
    assert fidelity["AP"] > 0.95 and fidelity["AP50"] > 0.99
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]} for d in ort_dets]
    assert evaluate_detections(reference, shifted, class_agnostic=True)["AP"] < 0.5 * fidelity["AP"]


def test_eval_bad_inputs_are_one_line(small_onnx: Path, tiny_set: Path, tmp_path: Path) -> None:
    ann, images = tiny_set / "annotations.json", tiny_set / "images"
    base = ("eval", str(small_onnx), "--class-agnostic", "--backend", "onnxruntime")
    assert_one_line_error(run(*base, "--data", str(tmp_path / "nope.json"), "--images", str(images)), "does not exist")
    (tmp_path / "corrupt.json").write_text('{"images": [')
    assert_one_line_error(run(*base, "--data", str(tmp_path / "corrupt.json"), "--images", str(images)), "invalid JSON")
    assert_one_line_error(run(*base, "--data", str(ann), "--images", str(tmp_path)), "4 of 4 images", "missing")
    assert_one_line_error(run(*base, "--data", str(ann), "--images", str(images), "--max-images", "0"), "at least 1")
    proc = run("eval", "--data", str(ann), "--images", str(images))
    assert_one_line_error(proc, "either a model file or --method")
    proc = run("eval", "--method", "thumbdet", "--backend", "onnxruntime", "--data", str(ann), "--images", str(images))
    assert_one_line_error(proc, "PyTorch model only", "export it first")
    # label spaces that cannot be mapped: 91 COCO classes vs one category, without --class-agnostic
    proc = run("eval", str(small_onnx), "--data", str(ann), "--images", str(images), "--max-images", "1")
    assert_one_line_error(proc, "91 classes", "--class-agnostic")
    # an unreadable image
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    (broken / "000000.png").write_bytes(b"\x89PNG not really")
    assert_one_line_error(run(*base, "--data", str(ann), "--images", str(broken)), "cannot read image", "000000.png")
    # --fidelity on a model with nothing that confident: the AP it computed is still printed, then one line
    # and exit 2, with no JSON that looks finished
    out_json = tmp_path / "no_fidelity.json"
    proc = run(*base, "--data", str(ann), "--images", str(images), "--max-images", "1", "--fidelity",
               "--fidelity-score", "1", "--json", str(out_json))  # fmt: skip
    assert_one_line_error(proc, "no detection scoring 1 or more", "lower --fidelity-score")
    assert "APvt" in proc.stdout and "onnxruntime" in proc.stdout
    assert not out_json.exists()


def test_eval_nan_model_output_is_one_line(small_onnx: Path, tiny_set: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(small_onnx))
    producer = next(node for node in model.graph.node if "scores" in node.output)
    producer.output[list(producer.output).index("scores")] = "scores_finite"
    model.graph.initializer.append(helper.make_tensor("nan_scale", TensorProto.FLOAT, [], [float("nan")]))
    model.graph.node.append(helper.make_node("Mul", ["scores_finite", "nan_scale"], ["scores"]))
    nan_model = tmp_path / "nan.onnx"
    onnx.save(model, str(nan_model))
    shutil.copy(small_onnx.with_suffix(".json"), nan_model.with_suffix(".json"))
    proc = run("eval", str(nan_model), "--data", str(tiny_set / "annotations.json"), "--images",
               str(tiny_set / "images"), "--class-agnostic", "--max-images", "1")  # fmt: skip
    assert_one_line_error(proc, "NaN/Inf scores", "onnxruntime")


def _variant(
    source: Path, folder: Path, precision: str, box_shift: float | None, layout: str | None = None, weights: str = ""
) -> Path:
    """A copy of an export whose sidecar names a precision (and INT8 layout), optionally with the last box
    layer's bias shifted (random-weight DETR boxes hardly depend on the image, so its input would not do)."""
    model = onnx.load(str(source))
    if box_shift is not None:
        bias = next(t for t in model.graph.initializer if t.name.endswith("bbox_embed.5.layers.2.bias"))
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + box_shift, bias.name))
    folder.mkdir()
    path = folder / f"model.{precision}.onnx"
    onnx.save(model, str(path))
    quantization = {"precision": precision, "layout": {"target": layout, "weights": weights} if layout else None}
    sidecar = json.loads(source.with_suffix(".json").read_text()) | {"quantization": quantization}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def _crossed_box_by_box(reference: list[dict[str, Any]], row: list[dict[str, Any]], cut: float) -> int:
    """Class-agnostic reference count for ``crossed_the_cut``: box by box, IoU of xywh boxes in plain Python."""

    def iou(a: list[float], b: list[float]) -> float:
        w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
        h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
        inter = max(w, 0.0) * max(h, 0.0)
        return inter / (a[2] * a[3] + b[2] * b[3] - inter)

    count = 0
    for d in (d for d in row if d["score"] >= cut):
        same_image = [r for r in reference if r["image_id"] == d["image_id"]]
        on = [r["score"] >= cut for r in same_image if iou(d["bbox"], r["bbox"]) >= 0.5]
        count += bool(on) and not any(on)
    return count


def test_compare_rows_and_fidelity(small_onnx: Path, tiny_set: Path, tmp_path: Path) -> None:
    """--compare adds onnxruntime rows named by precision; --fidelity scores them against the FP32 row."""
    same = _variant(small_onnx, tmp_path / "a", "same", None)
    perturbed = _variant(small_onnx, tmp_path / "b", "perturbed", 0.5)
    report = evaluate_model(
        small_onnx, tiny_set / "annotations.json", tiny_set / "images", backends="onnxruntime", class_agnostic=True,
        log=lambda _l: None, compare=[same, perturbed], noise_floor=True,
    )  # fmt: skip
    score_fidelity(report, 0.0)
    floor = "onnxruntime on +-1 grey level"
    assert list(report.results) == ["onnxruntime", "onnxruntime same", "onnxruntime perturbed", floor]
    assert report.fidelity_reference == "onnxruntime" and list(report.fidelity) == list(report.results)[1:]
    # the noise-floor row: the FP32 file itself with its input moved by a grey level: other detections (scores
    # move), yet far closer to the reference than perturbed weights
    assert report.noise_floor_row == floor and report.to_dict()["fidelity"]["noise_floor_row"] == floor
    assert report.detections[floor] != report.detections["onnxruntime"]
    assert report.fidelity[floor]["AP50"] > 0.9  # the perturbed row's is under 0.9 (below)
    assert report.fidelity["onnxruntime same"]["AP50"] > 0.99
    assert report.fidelity["onnxruntime perturbed"]["AP50"] < 0.9
    assert report.to_dict()["fidelity"]["results"]["onnxruntime same"]["AP"] > 0.99
    # crossed, at a cut with boxes on both sides (the median reference score): the same weights move no
    # score across it; the perturbed row's count matches a plain-Python count over the rows' own detections
    cut = float(np.median([d["score"] for d in report.detections["onnxruntime"]]))
    rescored = copy.copy(report)
    rescored.fidelity = {}
    score_fidelity(rescored, cut)
    same_row = rescored.fidelity["onnxruntime same"]
    assert same_row["crossed_up"] == same_row["crossed_down"] == 0.0
    reference_dets, perturbed_dets = report.detections["onnxruntime"], report.detections["onnxruntime perturbed"]
    up, down = (
        _crossed_box_by_box(reference_dets, perturbed_dets, cut),
        _crossed_box_by_box(perturbed_dets, reference_dets, cut),
    )
    above = sum(d["score"] >= cut for d in reference_dets)
    perturbed_row = rescored.fidelity["onnxruntime perturbed"]
    assert (perturbed_row["counts"]["crossed_up"], perturbed_row["counts"]["crossed_down"]) == (up, down)
    assert up > 0  # (down is 0 here: the perturbed weights raise scores; the unit test covers that side)
    assert perturbed_row["crossed_up"] == pytest.approx(up / above)
    assert perturbed_row["crossed_down"] == pytest.approx(down / above)
    with pytest.raises(UserError, match="no detection scoring 1.01"):
        score_fidelity(copy.copy(report), 1.01)

    # The floors of `eval --min-ap50/--min-fidelity` on the same report: a row is named when it is below.
    fidelity_failures = check_floors(report, None, 0.95)
    assert [(f.row, f.floor_name) for f in fidelity_failures] == [("onnxruntime perturbed", "fidelity")]
    # the noise-floor row is a yardstick: a floor above every row's value names every row but it
    assert [f.row for f in check_floors(report, None, 1.01)] == list(report.fidelity)[:-1]
    assert "onnxruntime perturbed: fidelity AP50" in fidelity_failures[0].line()
    assert check_floors(report, None, 0.0) == []
    # Random weights find none of the labelled objects: every row but the yardstick is below an AP50 floor of 0.5.
    assert [f.row for f in check_floors(report, 0.5, None)] == list(report.results)[:-1]
    # nothing to gate but the yardstick: the floor cannot be checked, which is an error, not a pass
    alone = evaluate_model(small_onnx, tiny_set / "annotations.json", tiny_set / "images", class_agnostic=True,
                           max_images=1, log=lambda _l: None, noise_floor=True)  # fmt: skip
    score_fidelity(alone, 0.0)
    assert list(alone.fidelity) == [floor]
    with pytest.raises(UserError, match="--min-fidelity needs a row to compare"):
        check_floors(alone, None, 0.9)


def test_compare_rows_name_the_int8_layout(small_onnx: Path, tmp_path: Path) -> None:
    """Both INT8 layouts of one model are rows of one eval, named by layout (both were 'int8' before), and
    onnxruntime's layout with 8-bit weights is a row of its own."""
    files = [_variant(small_onnx, tmp_path / target, "int8", None, target, f"int{bits} symmetric per channel")
             for target, bits in (("tensorrt", 8), ("onnxruntime", 7))]  # fmt: skip
    files.append(_variant(small_onnx, tmp_path / "w8", "int8", None, "onnxruntime", "int8 symmetric per channel"))
    size = tuple(json.loads(small_onnx.with_suffix(".json").read_text())["recipe"]["input_size"])
    names = list(compare_runners(files, size, log=lambda _l: None))
    assert names == ["onnxruntime int8 (tensorrt layout)", "onnxruntime int8 (onnxruntime layout)",
                     "onnxruntime int8 (onnxruntime layout, 8-bit weights)"]  # fmt: skip
    with pytest.raises(UserError, match="given twice"):
        compare_runners([files[0], files[0]], size)


def test_compare_rows_of_one_precision_add_file_names(small_onnx: Path, tmp_path: Path) -> None:
    """Two INT8 files of one layout (say quantized with different --exclude) are two rows, told apart by their
    file names; rows of a precision given once keep the plain name, and two files of one name are an error."""
    fp16 = _variant(small_onnx, tmp_path / "h", "fp16", None)
    all_int8 = _variant(small_onnx, tmp_path / "a", "int8", None, "onnxruntime", "int7 symmetric per channel")
    fpn_float = all_int8.with_name("model.int8-fpn-float.onnx")
    for suffix in (".onnx", ".json"):
        fpn_float.with_suffix(suffix).write_bytes(all_int8.with_suffix(suffix).read_bytes())
    size = tuple(json.loads(small_onnx.with_suffix(".json").read_text())["recipe"]["input_size"])
    names = list(compare_runners([fp16, all_int8, fpn_float], size, log=lambda _l: None))
    assert names == ["onnxruntime fp16", f"onnxruntime int8 (onnxruntime layout) {all_int8.name}",
                     "onnxruntime int8 (onnxruntime layout) model.int8-fpn-float.onnx"]  # fmt: skip
    namesake = _variant(small_onnx, tmp_path / "b", "int8", None, "onnxruntime", "int7 symmetric per channel")
    assert namesake.name == all_int8.name
    with pytest.raises(UserError, match="rename one"):
        compare_runners([all_int8, namesake], size)


def test_eval_gate_exit_status(small_onnx: Path, tiny_set: Path, tmp_path: Path) -> None:
    """`eval --min-ap50 X --min-fidelity X` as a CI step: 0 when every row clears both floors, 1 naming each
    row below, the tables and JSON written either way. The labels are the FP32 model's own confident
    detections, so its rows can clear a high AP50 floor (random weights find none of the real objects)."""
    same = _variant(small_onnx, tmp_path / "a", "same", None)
    perturbed = _variant(small_onnx, tmp_path / "b", "perturbed", 0.5)
    images = tiny_set / "images"
    fp32 = evaluate_model(small_onnx, tiny_set / "annotations.json", images, class_agnostic=True, max_images=2,
                          log=lambda _l: None)  # fmt: skip
    truth = detections_as_ground_truth(json.loads((tiny_set / "annotations.json").read_text()),
                                       fp32.detections["onnxruntime"], 0.0)  # fmt: skip
    truth["images"] = truth["images"][:2]  # the two evaluated; their detections are all the annotations
    labels = tmp_path / "own_detections.json"
    labels.write_text(json.dumps(truth))
    assert truth["annotations"]
    base = ("eval", str(small_onnx), "--data", str(labels), "--images", str(images), "--class-agnostic",
            "--fidelity-score", "0", "--min-ap50", "0.9", "--min-fidelity", "0.95")  # fmt: skip
    ok = run(*base, "--compare", str(same), "--json", str(tmp_path / "ok.json"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "ok.json").read_text())["gate"]["failed"] == []
    bad = run(*base, "--compare", str(same), "--compare", str(perturbed), "--noise-floor",
              "--json", str(tmp_path / "bad.json"))  # fmt: skip
    assert bad.returncode == 1, bad.stderr
    named = [line for line in bad.stderr.splitlines() if line.startswith("below the floor:")]
    assert len(named) == 2 and all("onnxruntime perturbed:" in line for line in named), bad.stderr
    assert "Traceback" not in bad.stderr and "onnxruntime perturbed" in bad.stdout  # the table still printed
    failed = json.loads((tmp_path / "bad.json").read_text())["gate"]["failed"]
    assert {(f["row"], f["floor"]) for f in failed} == {("onnxruntime perturbed", "ap50"),
                                                         ("onnxruntime perturbed", "fidelity")}  # fmt: skip
    # --noise-floor ran: its row is in the JSON and the table, named, and ungated
    fidelity = json.loads((tmp_path / "bad.json").read_text())["fidelity"]
    assert fidelity["noise_floor_row"] in fidelity["results"] and "on +-1 grey level" in bad.stdout


def test_tables_print_row_names_whole() -> None:
    """Row names reach the terminal as they are: rich reads "[...]" as markup and dropped it (a row named by
    its file, such as ``model[fpn].int8.onnx``, lost the part that told two rows apart)."""
    from rich.console import Console

    from tod_deploy.evaluation.report import eval_table, fidelity_table
    from tod_deploy.evaluation.run import EvalReport

    metrics: dict[str, Any] = {
        m: 0.5 for m in ("AP", "AP50", "AP75", "APvt", "APt", "APs", "APm", "AR50", "crossed_up", "crossed_down")
    }
    metrics["counts"] = {"detections": 3}
    rows = ["onnxruntime", "onnxruntime int8 (onnxruntime layout) model[fpn].int8.onnx"]
    report = EvalReport("m.onnx", "cfinet", (64, 64), "a.json", "images", 1, True, 100,
                        results={r: metrics for r in rows}, fidelity={rows[1]: metrics},
                        fidelity_reference=rows[0], fidelity_min_score=0.3)  # fmt: skip
    console = Console(width=200, record=True)
    for table in (eval_table(report), fidelity_table(report)):
        console.print(table)
    assert console.export_text().count("model[fpn].int8.onnx") == 2
