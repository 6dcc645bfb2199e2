"""Calibration data: an image set in, model-ready batches and activation ranges out.

An image set is a folder with ``manifest.json`` (files and their SHA-256, see calibration/README.md)
or a plain folder of images; ``tod_deploy.evaluation.datasets`` reads both and refuses missing,
altered or unreadable files. Each image becomes the deploy contract's input (float32 RGB 0..255,
NCHW, letterboxed into the model's input size, as evaluation feeds it).

``--calib-size N`` samples: with N at most the set's size, N images chosen by the seed; beyond
that, every image once plus seeded random crops (50-100% of each side) with random horizontal
flips, so a 6-photo set still gives N distinct samples. Same set + seed + N -> the same samples,
hence the same ranges and the same scales.

Ranges come from onnxruntime's calibrators (Entropy, MinMax, Percentile) over the quantizable
layers' tensors; the session is ours so that ``tod`` custom-op nodes run (their library registered).
Entropy is the default, as TensorRT's own calibrator for CNNs. On the trained checkpoints of
``benchmarks/train_synthetic.py`` (512x512, 8 held-out images), onnxruntime layout, it kept INT8
fidelity equal or higher than max for every model (CFINet 0.858 -> 0.916, BH Faster R-CNN 0.953 ->
0.984, SR-TOD and BH FCOS equal): max lets the rare peaks of a residual stream set the scale of all
its values. In the tensorrt layout it moved CFINet 0.726 -> 0.818 and BH Faster R-CNN 0.934 -> 0.887;
``--method max`` is there for models like the latter.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tod_deploy.errors import UserError
from tod_deploy.evaluation.datasets import letterbox, read_image_set, read_rgb, sha256_of

METHODS = {"entropy": "Entropy", "max": "MinMax", "percentile": "Percentile"}
DEFAULT_SET = "photos"


def calibration_root() -> Path:
    """``calibration/`` of the source tree (image sets ship there, not inside the package)."""
    return Path(__file__).resolve().parents[2] / "calibration"


def resolve_set(calib: Path | str | None) -> Path:
    """``--calib``: a folder, or the name of a set under calibration/ (default: photos)."""
    if calib is None:
        for candidate in (Path("calibration") / DEFAULT_SET, calibration_root() / DEFAULT_SET):
            if candidate.is_dir():
                return candidate
        raise UserError("no calibration images given and calibration/photos is not here", "pass --calib DIR")
    path = Path(calib)
    if path.is_dir():
        return path
    named = calibration_root() / str(calib)
    if not path.exists() and len(path.parts) == 1 and named.is_dir():
        return named
    raise UserError(f"calibration set {calib} is not a folder", "pass a folder of images, e.g. calibration/photos")


@dataclass
class CalibrationSet:
    folder: Path
    files: list[Path]
    hashes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "set": str(self.folder),
            "images": [{"file": f.name, "sha256": h} for f, h in zip(self.files, self.hashes, strict=True)],
        }


def read_calibration_set(folder: Path, decode: bool = False) -> CalibrationSet:
    """The set's files in order, each hash checked against the manifest (when there is one).

    ``decode``: also decode every image now, so an unreadable file is refused before any work starts.
    """
    files = read_image_set(folder, verify=True)
    if decode:
        for path in files:
            read_rgb(path)
    return CalibrationSet(folder, files, [sha256_of(f) for f in files])


def load_sample(path: Path, size_hw: tuple[int, int], crop: tuple[float, float, float, float] | None, flip: bool):
    """One image file -> float32 [3, H, W] RGB 0..255 (the single loader of calibration; swap it here)."""
    rgb = read_rgb(path)
    if crop is not None:
        h, w = rgb.shape[:2]
        y0, x0, fh, fw = crop
        ch, cw = max(8, round(h * fh)), max(8, round(w * fw))
        top, left = round(y0 * (h - ch)), round(x0 * (w - cw))
        rgb = rgb[top : top + ch, left : left + cw]
    if flip:
        rgb = rgb[:, ::-1]
    chw, _ = letterbox(np.ascontiguousarray(rgb), size_hw)
    return chw


def sample_plan(n_files: int, count: int | None, seed: int) -> list[tuple[int, Any, bool]]:
    """(file index, crop or None, flip) per sample; see the module docstring."""
    if count is not None and count < 1:
        raise UserError(f"--calib-size {count} is not a number of images", "pass --calib-size 1 or more")
    rng = np.random.default_rng(seed)
    count = n_files if count is None else count
    if count <= n_files:
        return [(int(i), None, False) for i in sorted(rng.permutation(n_files)[:count])]
    plan: list[tuple[int, Any, bool]] = [(i, None, False) for i in range(n_files)]
    while len(plan) < count:
        i = int(rng.integers(n_files))
        fh, fw = rng.uniform(0.5, 1.0, size=2)
        y0, x0 = rng.uniform(0.0, 1.0, size=2)
        plan.append((i, (float(y0), float(x0), float(fh), float(fw)), bool(rng.integers(2))))
    return plan


def calibration_batches(
    cal: CalibrationSet, size_hw: tuple[int, int], batch: int, count: int | None, seed: int
) -> list[np.ndarray]:
    """The samples, grouped into the model's batch size (float32 [B, 3, H, W])."""
    plan = sample_plan(len(cal.files), count, seed)
    samples = [load_sample(cal.files[i], size_hw, crop, flip) for i, crop, flip in plan]
    groups = [samples[i : i + batch] for i in range(0, len(samples) - batch + 1, batch)] or [samples[:1] * batch]
    return [np.stack(g).astype(np.float32) for g in groups]


def progress_bar(total: int, description: str, show: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not show, transient=False,
    )  # fmt: skip
    return progress, progress.add_task(description, total=total)


class BatchReader:
    """onnxruntime's CalibrationDataReader protocol over prepared batches, advancing a progress bar."""

    def __init__(self, input_name: str, batches: list[np.ndarray], on_batch: Callable[[], None] | None = None) -> None:
        self.input_name, self.batches, self.on_batch = input_name, batches, on_batch
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        value = next(self._it, None)
        if value is None:
            return None
        if self.on_batch:
            self.on_batch()
        return {self.input_name: value}

    def __len__(self) -> int:
        return len(self.batches)

    def rewind(self) -> None:
        self._it = iter(self.batches)


def _calibrator(method: str, model_path: Path, augmented: Path, op_types: list[str] | None, symmetric: bool) -> Any:
    from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater

    if method == "max":
        return MinMaxCalibrater(model_path, op_types, str(augmented), symmetric=symmetric)
    if method == "entropy":
        return EntropyCalibrater(model_path, op_types, str(augmented), symmetric=symmetric, num_bins=128)
    if method == "percentile":
        return PercentileCalibrater(model_path, op_types, str(augmented), symmetric=symmetric, percentile=99.999)
    raise UserError(f"unknown calibration method {method!r}", f"use one of: {', '.join(METHODS)}")


def compute_ranges(
    model: onnx.ModelProto,
    batches: list[np.ndarray],
    method: str = "max",
    op_types: list[str] | None = None,
    show_progress: bool = True,
    description: str = "calibrating",
    symmetric: bool = True,
) -> Any:
    """Activation ranges (onnxruntime ``TensorsData``) of the tensors around ``op_types`` nodes (None: all);
    ``symmetric``: each range widened to [-m, m] (for zero-point-0 quantization).

    onnxruntime builds the augmented graph; we open its session (with the tod custom-op library when
    the model has tod nodes) and feed it the batches.
    """
    from tod_deploy.backends.onnxruntime_runner import new_session

    with tempfile.TemporaryDirectory(prefix="tod-quant-") as tmp:
        src, augmented = Path(tmp) / "model.onnx", Path(tmp) / "augmented.onnx"
        onnx.save(model, str(src))
        calibrator = _calibrator(method, src, augmented, op_types, symmetric)
        calibrator.augment_graph()
        calibrator.infer_session = new_session(augmented, optimize=False)
        progress, task = progress_bar(len(batches), description, show_progress)
        # onnxruntime's calibrators print their progress on stdout; stdout is for our tables
        with progress, contextlib.redirect_stdout(io.StringIO()):
            # One batch per collect_data call: the histogram calibrators keep every tensor of every batch
            # until the call ends (measured: percentile at 512x512 on 32 samples ran out of 24 GiB), and
            # each call folds its batch into the running min/max or histograms.
            for one in batches:
                calibrator.collect_data(BatchReader(model.graph.input[0].name, [one], lambda: progress.advance(task)))
            ranges = calibrator.compute_data()
        del calibrator
    return ranges
