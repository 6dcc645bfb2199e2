"""A small synthetic tiny-object data set: objects of 2-64 px drawn on real-photo backgrounds, COCO JSON out.

Object sizes are spread evenly over the AI-TOD bins on sqrt(area) (very tiny 2-8, tiny 8-16,
small 16-32, medium 32-64 px), so every bin of the evaluation has objects. Backgrounds are
random crops of an image set (default: the project's ``calibration/photos``). Everything comes
from ``numpy.random.default_rng((seed, image_index))``: the same seed gives the same files, byte
for byte, and image i does not depend on how many images were asked for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tod_deploy.errors import UserError
from tod_deploy.evaluation.coco_eval import AITOD_BINS, size_bin
from tod_deploy.evaluation.datasets import read_image_set, read_rgb, sha256_of

GENERATOR = "tod-deploy synthetic tiny objects, version 1"
CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
ANNOTATIONS = "annotations.json"
IMAGES = "images"


def default_backgrounds() -> Path:
    """The image set that ships with the project (calibration/photos beside the package)."""
    return Path(__file__).resolve().parents[2] / "calibration" / "photos"


@dataclass
class SyntheticSet:
    root: Path
    annotations: Path
    images: int
    objects: int
    per_bin: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "annotations": str(self.annotations),
            "images": self.images,
            "objects": self.objects,
            "per_bin": self.per_bin,
        }


def _background(photo: np.ndarray, size_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``photo`` (40-100 % of its shorter side, the output's aspect), resized, maybe mirrored."""
    from PIL import Image

    h, w = size_hw
    ph, pw = photo.shape[:2]
    frac = rng.uniform(0.4, 1.0)
    ch = max(2, min(ph, round(min(ph, pw * h / w) * frac)))
    cw = max(2, min(pw, round(ch * w / h)))
    y0 = int(rng.integers(0, ph - ch + 1))
    x0 = int(rng.integers(0, pw - cw + 1))
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.BILINEAR)
    out = np.asarray(crop, dtype=np.uint8)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out.copy()


def _object_size(bin_range: tuple[float, float], limit: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """Integer (w, h) with sqrt(w*h) inside [lo, hi), aspect 1:2..2:1, log-uniform side."""
    lo, hi = bin_range
    for _ in range(100):
        side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        w, h = round(side * math.sqrt(aspect)), round(side / math.sqrt(aspect))
        if w >= 1 and h >= 1 and lo <= math.sqrt(w * h) < hi and w <= limit[1] and h <= limit[0]:
            return w, h
    side = max(1, math.ceil(lo))
    return side, side


def _color(patch: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour whose brightness differs from the patch's mean by at least 70 (of 255)."""
    mean = float(patch.mean()) if patch.size else 128.0
    for _ in range(50):
        color = rng.integers(0, 256, size=3)
        if abs(float(color.mean()) - mean) >= 70:
            return int(color[0]), int(color[1]), int(color[2])
    return (0, 0, 0) if mean > 127 else (255, 255, 255)


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], margin: int = 2) -> bool:
    x, y, w, h = box
    return any(
        x < bx + bw + margin and bx < x + w + margin and y < by + bh + margin and by < y + h + margin
        for bx, by, bw, bh in boxes
    )


def _draw_object(draw: Any, box: tuple[int, int, int, int], color: tuple[int, int, int], kind: int) -> None:
    """Fill exactly the box's pixels' extent: a rectangle, an ellipse, or a rectangle with a darker stripe."""
    x, y, w, h = box
    x1, y1 = x + w - 1, y + h - 1
    if kind == 1 and w >= 3 and h >= 3:
        draw.ellipse([x, y, x1, y1], fill=color)
    else:
        draw.rectangle([x, y, x1, y1], fill=color)
        if kind == 2 and w >= 4 and h >= 4:  # a "vehicle": a darker roof stripe along the long side
            dark = tuple(c // 2 for c in color)
            if w >= h:
                draw.rectangle([x + w // 4, y + h // 3, x1 - w // 4, y1 - h // 3], fill=dark)
            else:
                draw.rectangle([x + w // 3, y + h // 4, x1 - w // 3, y1 - h // 4], fill=dark)


def make_image(
    index: int, seed: int, photos: list[np.ndarray], size_hw: tuple[int, int], objects: tuple[int, int]
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Image ``index`` of the set with ``seed``: uint8 [H, W, 3] and its boxes (x, y, w, h), whole pixels."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng((seed, index))
    h, w = size_hw
    canvas = _background(photos[int(rng.integers(len(photos)))], size_hw, rng)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    bins = list(AITOD_BINS.values())
    count = int(rng.integers(objects[0], objects[1] + 1))
    first_bin = int(rng.integers(len(bins)))
    boxes: list[tuple[int, int, int, int]] = []
    for k in range(count):
        bw, bh = _object_size(bins[(first_bin + k) % len(bins)], (h, w), rng)
        for _ in range(30):
            box = (int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1)), bw, bh)
            if not _overlaps(box, boxes):
                break
        else:
            continue  # crowded: leave this object out rather than overlap
        x, y = box[0], box[1]
        color = _color(canvas[y : y + bh, x : x + bw], rng)
        _draw_object(draw, box, color, int(rng.integers(3)))
        boxes.append(box)
    return np.asarray(image, dtype=np.uint8), boxes


def generate_synthetic(
    out: Path,
    images: int = 32,
    seed: int = 0,
    size_hw: tuple[int, int] = (512, 512),
    backgrounds: Path | None = None,
    objects: tuple[int, int] = (8, 24),
    overwrite: bool = False,
) -> SyntheticSet:
    """Write ``out/images/*.png`` and ``out/annotations.json`` (COCO, one category 'object')."""
    from PIL import Image

    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}", "pass a positive count")
    h, w = size_hw
    if h < 64 or w < 64:
        raise UserError(f"image size {h}x{w} is too small for objects up to 64 px", "use --size of at least 64x64")
    if not 1 <= objects[0] <= objects[1]:
        raise UserError(f"bad object count range {objects}", "use e.g. 8 to 24 objects per image")
    source = backgrounds or default_backgrounds()
    if not source.is_dir():
        raise UserError(f"background folder {source} does not exist", "pass a folder of photos with --backgrounds")
    files = read_image_set(source)
    photos = [read_rgb(p) for p in files]
    ann_path, img_dir = out / ANNOTATIONS, out / IMAGES
    if not overwrite and (ann_path.exists() or (img_dir.is_dir() and any(img_dir.iterdir()))):
        raise UserError(f"{out} already holds a data set", "pass a new folder with --out, or --overwrite")
    img_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in img_dir.glob("*.png"):
            old.unlink()
    coco_images, annotations = [], []
    per_bin = dict.fromkeys(AITOD_BINS, 0)
    for i in range(images):
        pixels, boxes = make_image(i, seed, photos, size_hw, objects)
        name = f"{i:06d}.png"
        Image.fromarray(pixels).save(img_dir / name, optimize=False, compress_level=6)
        coco_images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for x, y, bw, bh in boxes:
            per_bin[size_bin(math.sqrt(bw * bh))] += 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": CATEGORY["id"],
                    "bbox": [float(x), float(y), float(bw), float(bh)],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                }
            )
    dataset = {
        "info": {
            "description": GENERATOR,
            "seed": seed,
            "size": [h, w],
            "objects_per_image": list(objects),
            "backgrounds": [{"file": p.name, "sha256": sha256_of(p)} for p in files],
        },
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": [CATEGORY],
    }
    tmp = ann_path.with_name(f".{ANNOTATIONS}.partial")
    tmp.write_text(json.dumps(dataset, indent=1) + "\n")
    tmp.replace(ann_path)
    return SyntheticSet(out, ann_path, images, len(annotations), per_bin)
