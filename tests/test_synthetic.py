"""The synthetic tiny-object data set and the image sets in calibration/: sizes, bounds, determinism, manifests."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tod_deploy.errors import UserError
from tod_deploy.evaluation.coco_eval import AITOD_BINS
from tod_deploy.evaluation.datasets import read_image_set, read_rgb, sha256_of
from tod_deploy.evaluation.synthetic import default_backgrounds, generate_synthetic

PHOTOS = Path(__file__).resolve().parents[1] / "calibration" / "photos"


def digests(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    result = generate_synthetic(root, images=30, seed=7, size_hw=(200, 240))
    data = json.loads(result.annotations.read_text())
    assert result.objects == len(data["annotations"])
    return root, data


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_synthetic(tmp_path / name, images=3, seed=seed, size_hw=(128, 160))
    a, b, c = (digests(tmp_path / n) for n in "abc")
    assert len(a) == 4 and a == b
    assert set(a) == set(c)
    assert all(a[name] != c[name] for name in a)  # every image and the annotations change with the seed
    # Image i does not depend on how many images were asked for.
    generate_synthetic(tmp_path / "d", images=1, seed=3, size_hw=(128, 160))
    assert digests(tmp_path / "d")["images/000000.png"] == a["images/000000.png"]


def test_objects_cover_every_aitod_bin_inside_the_image(dataset: tuple[Path, dict]) -> None:
    root, data = dataset
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    per_bin = dict.fromkeys(AITOD_BINS, 0)
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        height, width = sizes[ann["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height, ann
        assert ann["area"] == w * h and ann["iscrowd"] == 0 and ann["category_id"] == 1
        side = math.sqrt(ann["area"])
        assert 2 <= side < 64, ann
        for name, (lo, hi) in AITOD_BINS.items():
            per_bin[name] += lo <= side < hi
    assert all(count >= 0.15 * len(data["annotations"]) for count in per_bin.values()), per_bin
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    for im in data["images"]:
        assert read_rgb(root / "images" / im["file_name"]).shape == (im["height"], im["width"], 3)


def test_boxes_sit_on_drawn_objects(dataset: tuple[Path, dict]) -> None:
    """Each box's pixels differ from the ring of pixels just outside it (the object is where the box says)."""
    root, data = dataset
    files = {im["id"]: im["file_name"] for im in data["images"]}
    contrasted = 0
    for ann in data["annotations"]:
        pixels = read_rgb(root / "images" / files[ann["image_id"]]).astype(np.float64)
        x, y, w, h = (int(v) for v in ann["bbox"])
        inside = pixels[y : y + h, x : x + w].reshape(-1, 3).mean(axis=0)
        y0, y1, x0, x1 = max(0, y - 2), min(pixels.shape[0], y + h + 2), max(0, x - 2), min(pixels.shape[1], x + w + 2)
        ring_mask = np.ones((y1 - y0, x1 - x0), dtype=bool)
        ring_mask[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = False
        ring = pixels[y0:y1, x0:x1][ring_mask].mean(axis=0)
        contrasted += float(np.abs(inside - ring).mean()) > 20
    assert contrasted >= 0.9 * len(data["annotations"])


def test_shipped_photos_manifest() -> None:
    assert default_backgrounds() == PHOTOS
    manifest = json.loads((PHOTOS / "manifest.json").read_text())
    assert manifest["format"] == "tod-deploy image set 1"
    entries = manifest["images"]
    assert len(entries) >= 5
    total = 0
    for entry in entries:
        path = PHOTOS / entry["file"]
        assert sha256_of(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
        assert read_rgb(path).shape == (entry["height"], entry["width"], 3)
        assert entry["source"] and ("CC0" in entry["license"] or "Public domain" in entry["license"])
        total += entry["bytes"]
    assert total < 1.5e6
    assert [p.name for p in read_image_set(PHOTOS)] == sorted(e["file"] for e in entries)


def test_image_set_refuses_tampered_missing_or_empty(tmp_path: Path) -> None:
    copy = tmp_path / "photos"
    shutil.copytree(PHOTOS, copy)
    victim = copy / json.loads((copy / "manifest.json").read_text())["images"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match="does not match its SHA-256"):
        read_image_set(copy)
    victim.unlink()
    with pytest.raises(UserError, match="missing"):
        read_image_set(copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no images"):
        read_image_set(tmp_path / "empty")
    own = tmp_path / "own"  # a user's folder without a manifest: its sorted image files
    own.mkdir()
    for name in ("b.jpg", "a.png", "notes.txt"):
        shutil.copy(PHOTOS / "rocket.jpg", own / name)
    assert [p.name for p in read_image_set(own)] == ["a.png", "b.jpg"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tod_deploy.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_make_dataset(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    proc = run_cli("make-dataset", "synthetic", "--out", str(out), "--images", "2", "--size", "96x128", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert "2 images" in proc.stdout and "vt" in proc.stdout
    data = json.loads((out / "annotations.json").read_text())
    assert len(data["images"]) == 2 and data["info"]["seed"] == 5
    assert read_rgb(out / "images" / "000001.png").shape == (96, 128, 3)
    for args, needle in (
        (("--out", str(out)), "already holds a data set"),
        (("--out", str(tmp_path / "x"), "--size", "32x32"), "too small"),
        (("--out", str(tmp_path / "y"), "--images", "0"), "at least 1"),
        (("--out", str(tmp_path / "z"), "--backgrounds", str(tmp_path / "nope")), "does not exist"),
    ):
        proc = run_cli("make-dataset", "synthetic", *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
