"""Run an export on one image and save its map-like extra outputs as PNG files.

SR-TOD's difference map shows where the reconstruction failed (where tiny objects hide); the
binary mask is what DGFE multiplies into P2. Users look at them to see what the model attends to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner, load_onnx
from tod_deploy.errors import UserError


def read_image(path: Path, size_hw: tuple[int, int]) -> np.ndarray:
    """RGB float32 [1, 3, H, W] in 0..255, resized to the model's input size."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"image {path} does not exist", "pass a PNG or JPEG file with --image")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size_hw[1], size_hw[0]), Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path}", "pass a PNG or JPEG file") from exc
    array = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)[None]
    if not np.isfinite(array).all():
        raise UserError(f"image {path} has non-finite pixels", "pass an ordinary 8-bit image")
    return np.ascontiguousarray(array)


def to_png(array: np.ndarray, path: Path) -> Path:
    """One [H, W] map, min-max scaled to 8 bits (a constant map becomes black)."""
    from PIL import Image

    lo, hi = float(array.min()), float(array.max())
    scaled = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L").save(path)
    return path


def save_extra_outputs(model_path: Path, image: Path, out_dir: Path) -> list[Path]:
    model = load_onnx(model_path)
    recipe = Sidecar.load(model_path).recipe
    maps = [o.name for o in model.graph.output if o.name in ("diff_map", "binary_mask")]
    if not maps:
        raise UserError(f"{model_path.name} has no map outputs", "export it with --extra-outputs diff_map to keep them")
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    images = read_image(image, recipe.input_size)
    if batch_dim.dim_value > 1:
        images = np.repeat(images, batch_dim.dim_value, axis=0)
    outputs = OnnxRuntimeRunner(model).run(images)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [to_png(outputs[name][0, 0], out_dir / f"{image.stem}_{name}.png") for name in maps]
