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
layers' tensors, or, for ``mse``, from the percentile calibrator's histograms and our own range
search (``mse_ranges``); the session is ours so that ``tod`` custom-op nodes run (their library
registered). Each INT8 layout has its default (``Int8Layout.calibration``), chosen on the trained
checkpoints of ``benchmarks/train_synthetic.py`` (512x512, 32 held-out images; fidelity = AP50 of
the INT8 detections against FP32's):

| layout      | model                    | entropy | percentile | mse  |
|-------------|--------------------------|---------|------------|------|
| onnxruntime | CFINet                   | 89.3    | 93.0       | 92.8 |
| onnxruntime | SR-TOD Faster R-CNN      | 90.7    | 93.3       | 92.8 |
| onnxruntime | BH-ResNet50 Faster R-CNN | 95.0    | 92.9       | 96.5 |
| tensorrt    | CFINet                   | 89.3    |            | 90.4 |
| tensorrt    | BH-ResNet50 Faster R-CNN | 94.9    |            | 93.7 |

So mse for the onnxruntime layout (uint8 with zero points): 1.5-3.6 points above the others on BH,
within 0.5 of percentile and 2.1-3.5 above entropy on the other two; differences under a point are
within what another calibration sample moves. Entropy, TensorRT's own calibrator, stays the tensorrt
layout's (symmetric int8), where neither won on both models.
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

METHODS = {"entropy": "Entropy", "max": "MinMax", "percentile": "Percentile", "mse": "Percentile histograms, MSE range"}
MSE_CANDIDATES = 256  # clipping points tried per side of a range
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
    if method in ("percentile", "mse"):  # mse: the percentile collector's histograms, our range search
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
            ranges = mse_ranges(calibrator.collector.histogram_dict) if method == "mse" else calibrator.compute_data()
        del calibrator
    return ranges


def mse_ranges(histograms: dict[str, tuple[Any, ...]]) -> Any:
    """``TensorsData`` with, per tensor, the range whose 8-bit quantization has the least squared error.

    Read from onnxruntime's percentile collector: a histogram of the values over [-T, T] (asymmetric,
    five fields) or of their magnitudes over [0, T] (symmetric, four fields). Error per value: s^2/12
    inside the range (rounding, s the step), the distance to the range's end outside it (clipping).
    This is pytorch-quantization's ``mse`` calibrator; onnxruntime has none. It sits between
    percentile (which keeps a tensor's rare peaks and coarsens its bulk) and entropy (which clips more);
    the module docstring has what each kept of trained models' detections.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    data = {}
    for name, (hist, edges, low, high, *rest) in histograms.items():
        centers = ((edges[:-1] + edges[1:]) / 2).astype(np.float64)
        lo, hi = float(min(low, 0)), float(max(high, 0))
        if hist.sum() > 0:
            if rest:
                lo, hi = mse_range(centers, hist.astype(np.float64), lo, hi, levels=255)
            else:
                _, hi = mse_range(centers, hist.astype(np.float64), 0.0, float(edges[-1]), levels=127)
                lo = -hi
        lowest, highest = np.array(lo, np.float32), np.array(hi, np.float32)
        data[name] = TensorData(lowest=lowest, highest=highest, hist=hist, bins=edges)
    return TensorsData(CalibrationMethod.Percentile, data)


def mse_range(centers: np.ndarray, counts: np.ndarray, lo: float, hi: float, levels: int) -> tuple[float, float]:
    """[lo, hi] (lo <= 0 <= hi) minimizing the histogram's squared quantization error with ``levels`` steps.

    The two ends are searched in turn (the step couples them), three rounds, each over
    ``MSE_CANDIDATES`` points between 1/256 of the end and the end itself.
    """

    def errors(los: np.ndarray, his: np.ndarray) -> np.ndarray:
        step = (his - los) / levels
        over = np.maximum(centers[None, :] - his[:, None], 0.0)
        under = np.maximum(los[:, None] - centers[None, :], 0.0)
        clipped = (over > 0) | (under > 0)
        return np.where(clipped, over**2 + under**2, (step**2 / 12)[:, None]) @ counts

    for _ in range(3):
        if hi > 0:
            his = np.linspace(hi / MSE_CANDIDATES, hi, MSE_CANDIDATES)
            hi = float(his[np.argmin(errors(np.full_like(his, lo), his))])
        if lo < 0:
            los = np.linspace(lo, lo / MSE_CANDIDATES, MSE_CANDIDATES)
            lo = float(los[np.argmin(errors(los, np.full_like(los, hi)))])
    return lo, hi
