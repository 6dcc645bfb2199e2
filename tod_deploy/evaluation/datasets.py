"""Images and annotations in, model-ready tensors out, and boxes back to the original pixels.

Three things live here, each reusable on its own (evaluation, INT8 calibration, demos):

* ``load_image(path, size)``: an RGB file -> float32 [3, H, W] in 0..255 (the deploy contract's
  input, DESIGN.md section 4), letterboxed into the model's input size, plus the ``Letterbox``
  that maps the model's boxes back to the original image;
* ``load_coco(...)``: a COCO-format annotation file checked at the boundary (every problem is a
  one-line ``UserError``: missing or corrupt JSON, images listed but absent, bad boxes);
* image sets (``calibration/<set>/``): a folder with ``manifest.json`` listing its image files
  and their SHA-256, read with ``read_image_set`` and written with ``write_image_set_manifest``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tod_deploy.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_SET_FORMAT = "tod-deploy image set 1"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- images


def read_rgb(path: Path) -> np.ndarray:
    """The pixels of an image file as uint8 [H, W, 3] RGB; a missing or unreadable file is a UserError."""
    if not path.is_file():
        raise UserError(f"image {path} does not exist", "check the path, or the images folder given with --images")
    return decode_rgb(path, str(path))


def decode_rgb(source: Path | BinaryIO, name: str) -> np.ndarray:
    """An encoded image (a file, or bytes in a stream: a served request's) as uint8 [H, W, 3] RGB;
    undecodable or empty is a UserError naming ``name``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as img:
            img.load()
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {name} (not a readable image file)", "replace or remove it") from exc
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise UserError(f"image {name} is empty", "replace or remove it")
    return rgb


@dataclass(frozen=True)
class Letterbox:
    """How an original image was placed into the model input: resized by (scale_x, scale_y), pasted at (pad_x, pad_y).

    The two scales are equal up to rounding of the resized size; keeping both maps boxes back exactly.
    """

    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    original_hw: tuple[int, int]
    input_hw: tuple[int, int]

    def to_original(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Boxes in model-input pixels [..., 4] -> original-image pixels, clipped to the image."""
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).copy()
        boxes[..., 0::2] = (boxes[..., 0::2] - self.pad_x) / self.scale_x
        boxes[..., 1::2] = (boxes[..., 1::2] - self.pad_y) / self.scale_y
        h, w = self.original_hw
        boxes[..., 0::2] = boxes[..., 0::2].clip(0, w)
        boxes[..., 1::2] = boxes[..., 1::2].clip(0, h)
        return boxes

    def to_array(self) -> np.ndarray:
        """float32 [6] (scale_x, scale_y, pad_x, pad_y, original H, W): how a served pipeline passes it
        from its preprocessing step to its postprocessing step."""
        return np.array([self.scale_x, self.scale_y, self.pad_x, self.pad_y, *self.original_hw], dtype=np.float32)

    @classmethod
    def from_array(cls, values: np.ndarray, input_hw: tuple[int, int] = (0, 0)) -> Letterbox:
        sx, sy, px, py, h0, w0 = (float(v) for v in values)
        return cls(sx, sy, int(px), int(py), (int(h0), int(w0)), input_hw)

    def to_input(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """The inverse (without clipping): original-image pixels -> model-input pixels."""
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).copy()
        boxes[..., 0::2] = boxes[..., 0::2] * self.scale_x + self.pad_x
        boxes[..., 1::2] = boxes[..., 1::2] * self.scale_y + self.pad_y
        return boxes


def letterbox(rgb: np.ndarray, size_hw: tuple[int, int], pad_value: int = 0) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio so the image fits ``size_hw``; pad right and bottom.

    Top-left placement (the DETR/mmdet padding convention) keeps the box mapping a pure scale.
    Returns float32 [3, H, W] RGB in 0..255 and the mapping.
    """
    from PIL import Image

    h0, w0 = rgb.shape[:2]
    h, w = size_hw
    scale = min(h / h0, w / w0)
    nh, nw = max(1, min(h, round(h0 * scale))), max(1, min(w, round(w0 * scale)))
    resized = rgb if (nh, nw) == (h0, w0) else np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    canvas = np.full((h, w, 3), pad_value, dtype=np.uint8)
    canvas[:nh, :nw] = resized
    chw = np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32)
    return chw, Letterbox(nw / w0, nh / h0, 0, 0, (h0, w0), (h, w))


def load_image(path: Path, size_hw: tuple[int, int], pad_value: int = 0) -> tuple[np.ndarray, Letterbox]:
    """An image file as the model's input: float32 [3, H, W] RGB 0..255, letterboxed; plus the mapping back."""
    return letterbox(read_rgb(path), size_hw, pad_value)


# ----------------------------------------------------------------------------- COCO annotations


@dataclass
class CocoData:
    """A checked COCO-format data set and where its images are."""

    path: Path
    images_dir: Path
    dataset: dict[str, Any]
    images: list[dict[str, Any]] = field(default_factory=list)  # the images to evaluate, in file order

    @property
    def categories(self) -> list[dict[str, Any]]:
        return sorted(self.dataset["categories"], key=lambda c: c["id"])

    def image_path(self, image: dict[str, Any]) -> Path:
        return self.images_dir / image["file_name"]

    def subset(self) -> dict[str, Any]:
        """The data set restricted to ``images`` (what --max-images evaluates)."""
        ids = {im["id"] for im in self.images}
        return {
            **{k: v for k, v in self.dataset.items() if k not in ("images", "annotations")},
            "images": list(self.images),
            "annotations": [a for a in self.dataset["annotations"] if a["image_id"] in ids],
        }


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{path} is not a usable COCO annotation file ({what})", "pass a COCO-format JSON with --data")


def read_coco_json(path: Path) -> dict[str, Any]:
    """Parse and check a COCO detection file: images, annotations (bbox xywh), categories."""
    if not path.is_file():
        raise UserError(f"annotation file {path} does not exist", "pass a COCO-format JSON with --data")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(path, f"invalid JSON: {getattr(exc, 'msg', type(exc).__name__)}") from exc
    if not isinstance(data, dict):
        raise _bad(path, "the top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _bad(path, f"no '{key}' list")
    if not data["categories"]:
        raise _bad(path, "no categories")
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise _bad(path, f"category without an integer id: {str(cat)[:80]}")
    image_ids = set()
    for im in data["images"]:
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise _bad(path, f"image entry without id/file_name: {str(im)[:80]}")
        image_ids.add(im["id"])
    if len(image_ids) != len(data["images"]):
        raise _bad(path, "duplicate image ids")
    category_ids = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
            raise _bad(path, f"annotation {i} has no [x, y, w, h] bbox")
        if not all(math.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
            raise _bad(path, f"annotation {i} has a non-finite or negative-size bbox {bbox}")
        if ann.get("image_id") not in image_ids:
            raise _bad(path, f"annotation {i} refers to unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in category_ids:
            raise _bad(path, f"annotation {i} has unknown category_id {ann.get('category_id')!r}")
        ann.setdefault("id", i + 1)
        ann.setdefault("area", float(bbox[2] * bbox[3]))
        ann.setdefault("iscrowd", 0)
    return data


def load_coco(path: Path, images_dir: Path, max_images: int | None = None) -> CocoData:
    """A COCO file and its image folder, checked: every image to evaluate must exist there."""
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images must be at least 1, got {max_images}", "pass a positive count, or omit it")
    data = read_coco_json(path)
    if not images_dir.is_dir():
        raise UserError(f"images folder {images_dir} does not exist", "pass the folder of the images with --images")
    images = data["images"][:max_images] if max_images is not None else list(data["images"])
    if not images:
        raise _bad(path, "no images")
    missing = [im["file_name"] for im in images if not (images_dir / im["file_name"]).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(images)} images listed in {path.name} are missing from {images_dir} "
            f"(first: {missing[0]})",
            "pass the folder holding the images with --images",
        )
    return CocoData(path, images_dir, data, images)


# ----------------------------------------------------------------------------- image sets (calibration/<set>/)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_entry(path: Path, **extra: Any) -> dict[str, Any]:
    """A manifest entry for one image file: name, sha256, bytes, width, height, plus ``extra`` (source, license)."""
    rgb = read_rgb(path)
    return {
        "file": path.name,
        "sha256": sha256_of(path),
        "bytes": path.stat().st_size,
        "width": int(rgb.shape[1]),
        "height": int(rgb.shape[0]),
        **extra,
    }


def write_image_set_manifest(folder: Path, entries: list[dict[str, Any]], description: str = "") -> Path:
    """Write ``folder/manifest.json`` for image files already in ``folder`` (entries from ``image_entry``)."""
    manifest = {
        "format": IMAGE_SET_FORMAT,
        "name": folder.name,
        "description": description,
        "images": sorted(entries, key=lambda e: e["file"]),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_image_set(folder: Path, verify: bool = True) -> list[Path]:
    """The image files of a set, in a fixed order.

    A folder with ``manifest.json`` lists its files (checked against their SHA-256 when ``verify``);
    a plain folder of images (a user's own) is taken as its sorted image files.
    """
    if not folder.is_dir():
        raise UserError(f"image set {folder} is not a folder", "pass a folder of images (e.g. calibration/photos)")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"image set {folder} has no images", f"put {'/'.join(IMAGE_SUFFIXES)} files there")
        return files
    try:
        data = json.loads(manifest.read_text())
        entries = data["images"]
        names = [e["file"] for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        fix = "see calibration/README.md for its format"
        raise UserError(f"{manifest} is not a valid image-set manifest", fix) from exc
    if not names:
        raise UserError(f"image set {folder} lists no images", f"add image files and their entries to {manifest}")
    files = []
    for entry in entries:
        path = folder / entry["file"]
        if not path.is_file():
            raise UserError(f"image {path} listed in {manifest.name} is missing", "restore it or remove its entry")
        if verify and entry.get("sha256") and sha256_of(path) != entry["sha256"]:
            raise UserError(f"image {path} does not match its SHA-256 in {manifest.name}", "restore the original file")
        files.append(path)
    return files
