"""Reduced precision, measured on trained models: one table of method x precision x layout with the FPS
ratio against FP32 in onnxruntime, the fidelity to FP32 and the AP50 on held-out data.

For each model (benchmarks/train_synthetic.py's names and settings): export FP32, from
``--checkpoints DIR/<model>.pth`` when there (seeded random weights otherwise: then AP50 means
nothing and fidelity mostly measures near-tied random scores), then ``quantize --precision fp16`` and
``--precision int8`` for both ``--target`` layouts (tensorrt, onnxruntime; onnxruntime's also with
``--weight-bits 8``), calibrated on ``--calib-size`` images the training set's generator makes at
``--size`` (train_synthetic's training seed): the data the model learnt from, at the size it is deployed
at, as a user calibrates. (Its 128x128 training images, letterboxed up to 512x512, show objects 4x larger
than the model will see, and calibrate the wrong ranges.) Then, as a user runs them:

- ``eval`` over a held-out synthetic set (``--data``; default: made at ``--size`` with train_synthetic's
  held-out seed, so the images are new to the model) with every file as a row and ``--fidelity``:
  AP50 against the labels, and fidelity = AP50 of a row's detections against FP32 onnxruntime's
  detections scoring >= ``--fidelity-score`` as ground truth (what the precision change alone costs),
  found = the share of those detections the row reproduces at IoU >= 0.5 at any score (fidelity
  below found: detections re-ranked around the score cut, not lost), and crossed up/down = per 100 FP32
  boxes, the row's boxes at or above the cut that FP32 scored under it, and FP32's boxes the row scores
  under it only (score noise across the cut, which ranks boxes wrongly both ways); plus the yardstick
  row of ``eval --noise-floor``: FP32 itself on each image moved by at most one grey level, the fidelity
  of a change nobody would call a change, which a precision's figure is read against;
- the FP32 file and every reduced-precision file timed in alternating rounds in onnxruntime on the
  CPU (tod_deploy.bench.timing.time_interleaved), ``--threads`` threads, in sessions whose idle threads
  do not spin (``interleaved_calls``: spinning, they slow the session timed next). FP16 runs there too, but its
  target is TensorRT on a GPU: onnxruntime's CPU provider has few FP16 kernels and casts around the rest.

Issue 16's targets: INT8 (onnxruntime layout) >= 1.5x FPS (ThumbDet 1.3x) with fidelity >= 0.95 and AP50
within 1 point of FP32; FP16 fidelity >= 0.99.

Usage: python benchmarks/precision_fidelity.py [--models bh,sr_tod,cfinet,thumbdet,dfr_det]
           [--checkpoints ~/.cache/tod-deploy/train_synthetic] [--size 512x512] [--images 16]
           [--calib-size 64] [--iters 5] [--threads N] [--fidelity-score 0.3] [--method mse]
           [--max-sign-flips 0.001]
           [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx
from train_synthetic import CLASSES, DEFAULT_CACHE, MODELS, TRAIN_SEED, VAL_SEED, synthetic_split

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends.onnxruntime_runner import interleaved_calls
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.cli import FIDELITY_MIN_SCORE, MAX_SIGN_FLIPS
from tod_deploy.environment import environment
from tod_deploy.errors import UserError
from tod_deploy.evaluation.run import evaluate_model, score_fidelity
from tod_deploy.evaluation.synthetic import ANNOTATIONS, IMAGES
from tod_deploy.export.pipeline import export_model
from tod_deploy.parity.comparator import verification_images
from tod_deploy.quant.pipeline import quantize_model
from tod_deploy.recipes import parse_input_size

# (row label as eval names a compared file, precision, INT8 layout, INT8 weight bits)
VARIANTS = (("fp16", "fp16", None, None), ("int8 (tensorrt layout)", "int8", "tensorrt", None),
            ("int8 (onnxruntime layout)", "int8", "onnxruntime", None),
            ("int8 (onnxruntime layout, 8-bit weights)", "int8", "onnxruntime", 8))  # fmt: skip


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def measure(name: str, args: argparse.Namespace, data: Path, calib: Path, out: Path) -> dict[str, Any]:
    method, extra, _, _ = MODELS[name]
    checkpoint = args.checkpoints / f"{name}.pth" if args.checkpoints else None
    if checkpoint is not None and not checkpoint.is_file():
        raise SystemExit(f"{checkpoint} does not exist; run benchmarks/train_synthetic.py --model {name} first")
    overrides = {**extra, "input_size": args.size}
    if checkpoint is None:  # the synthetic set's one class, as the trained checkpoints have it
        overrides |= {"classes": list(CLASSES), "model": {**extra.get("model", {}), "num_classes": 1}}
    log(f"{name}: export {args.size} from {checkpoint or 'seeded random weights'} ...")
    export = export_model(method, out / name, checkpoint, overrides=overrides, verify=False, name=name, log=log)
    fp32 = export.onnx_path
    files: dict[str, Path] = {}
    for label, precision, target, weight_bits in VARIANTS:
        log(f"{name}: quantize {label} ...")
        suffix = f"{'-' + target if target else ''}{f'-w{weight_bits}' if weight_bits else ''}"
        path = fp32.with_name(f"{name}.{precision}{suffix}.onnx")
        result = quantize_model(
            fp32, precision, calib=calib, calib_size=args.calib_size, target=target or "tensorrt", output=path,
            log=log, show_progress=False, max_sign_flips=args.max_sign_flips, method=args.method,
            weight_bits=weight_bits,
        )  # fmt: skip
        files[label] = result.output
        checks = (result.sidecar["quantization"].get("sign_check") or {}).get("layers", {})
        if checks:
            shares = ", ".join(f"{layer} {100 * c['share']:.2f}%" for layer, c in checks.items())
            log(f"{name}: {label}: {sum(c['int8'] for c in checks.values())} of {len(checks)} real layers feeding "
                f"1-bit layers in INT8; signs each flips alone: {shares}")  # fmt: skip
    report, no_fidelity = None, "seeded random weights"  # speed alone (their AP and fidelity mean nothing)
    if checkpoint is not None:
        report, no_fidelity = evaluate(fp32, list(files.values()), data, args.fidelity_score)
    images = verification_images(Sidecar.load(fp32).recipe, 1, seed=1)
    models = {label: onnx.load(str(path)) for label, path in {"fp32": fp32, **files}.items()}
    timings = time_interleaved(interleaved_calls(models, images, args.threads), 1, 1, args.iters, None)
    stats = {label: timing.stats() for label, timing in timings.items()}
    rows = []
    for label in ("fp32", *files):
        row_name = "onnxruntime" if label == "fp32" else f"onnxruntime {label}"
        metrics = report.results[row_name] if report else {}
        fidelity = report.fidelity.get(row_name) if report else None
        rows.append({
            "precision": label,
            "median_ms": stats[label]["median_ms"],
            "fps_ratio": stats[label]["fps"] / stats["fp32"]["fps"],
            **fidelity_fields(fidelity),
            "ap50": metrics.get("AP50"),
            "ap": metrics.get("AP"),
            "detections": metrics["counts"]["detections"] if metrics else None,
        })  # fmt: skip
    return {"model": name, "method": method, "checkpoint": str(checkpoint) if checkpoint else None,
            "input_size": args.size, "reference_boxes": fidelity_reference_boxes(report), "no_fidelity": no_fidelity,
            "rows": rows, "noise_floor": noise_floor_row(report)}  # fmt: skip


def evaluate(fp32: Path, others: list[Path], data: Path, min_score: float) -> tuple[Any, str | None]:
    """``eval --compare --noise-floor`` on the held-out set, then ``--fidelity`` scored on that one pass,
    and why fidelity is missing if it is: a model that has not learnt yet (FP32 scores nothing at
    ``min_score``; ThumbDet's DETR trained briefly) still gets its AP per row, and its speed is still
    measured. Any other bad input fails as it is."""
    report = evaluate_model(fp32, data / ANNOTATIONS, data / IMAGES, backends="onnxruntime", class_agnostic=True,
                            compare=others, log=log, noise_floor=True)  # fmt: skip
    try:
        score_fidelity(report, min_score)
    except UserError as error:
        log(f"{fp32.stem}: no fidelity ({error.problem}); AP alone")
        return report, error.problem
    return report, None


def noise_floor_row(report: Any) -> dict[str, Any] | None:
    """FP32 itself on images moved by at most one grey level (eval --noise-floor): the scale a fidelity
    figure is read on, since a precision change can hardly move detections less than such input noise."""
    if report is None or report.noise_floor_row not in report.fidelity:
        return None
    return fidelity_fields(report.fidelity[report.noise_floor_row])


def fidelity_fields(fidelity: dict[str, Any] | None) -> dict[str, float | None]:
    """A row's fidelity figures under the names this benchmark writes (None each when it has none)."""
    names = {"fidelity_ap50": "AP50", "fidelity_found": "AR50", "fidelity_crossed_up": "crossed_up",
             "fidelity_crossed_down": "crossed_down"}  # fmt: skip
    return {field: None if fidelity is None else fidelity[key] for field, key in names.items()}


def fidelity_reference_boxes(report: Any) -> int:
    """How many FP32 detections the fidelity rows were scored against."""
    if report is None:
        return 0
    return next(iter(report.fidelity.values()))["counts"]["ground_truth"] if report.fidelity else 0


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bh,sr_tod,cfinet,thumbdet,dfr_det")
    parser.add_argument("--checkpoints", type=lambda v: None if v == "none" else Path(v),
                        default=DEFAULT_CACHE if DEFAULT_CACHE.is_dir() else None,
                        help="train_synthetic.py's cache of <model>.pth (default: its cache when it exists; "
                        "none: seeded random weights, for speed alone).")  # fmt: skip
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--data", type=Path, default=None, help="A held-out COCO set (default: made, see above).")
    parser.add_argument("--images", type=int, default=16, help="Images of the held-out set made by default.")
    parser.add_argument("--calib-size", type=int, default=64, help="Calibration images (--calib-size).")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fidelity-score", type=float, default=FIDELITY_MIN_SCORE, help="As eval's default.")
    parser.add_argument("--method", default=None, help="quantize --method (default: each layout's own).")
    parser.add_argument("--max-sign-flips", type=float, default=MAX_SIGN_FLIPS,
                        help="quantize --max-sign-flips (1-bit models: 1 puts every real layer in INT8).")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="precision-"))
    size_hw = parse_input_size(args.size)
    data = args.data or synthetic_split(out / f"held-out-{args.size}", args.images, VAL_SEED, size_hw)
    calib = synthetic_split(out / f"calibration-{args.size}", args.calib_size, TRAIN_SEED, size_hw) / IMAGES
    print(f"CPU: {environment()['cpu']}, {args.threads} threads; held-out set {data}; "
          f"checkpoints {args.checkpoints or 'none (seeded random weights)'}")  # fmt: skip
    summary = []
    heading = ("model", "precision", "median ms", "FPS ratio", "fidelity", "found", "crossed up/down", "AP50", "AP")
    print("{:9s} {:40s} {:>9s} {:>9s} {:>8s} {:>6s} {:>15s} {:>6s} {:>6s}".format(*heading))
    for name in args.models.split(","):
        result = measure(name, args, data, calib, out)
        summary.append(result)
        for r in result["rows"]:
            crossed = f"{percent(r['fidelity_crossed_up'])}/{percent(r['fidelity_crossed_down'])}"
            scores = (percent(r["fidelity_ap50"]), percent(r["fidelity_found"]), crossed, percent(r["ap50"]),
                      percent(r["ap"]))  # fmt: skip
            print(f"{name:9s} {r['precision']:40s} {r['median_ms']:9.1f} {r['fps_ratio']:8.2f}x "
                  "{:>8s} {:>6s} {:>15s} {:>6s} {:>6s}".format(*scores), flush=True)  # fmt: skip
        if result["no_fidelity"]:
            print(f"{name:9s} no fidelity: {result['no_fidelity']}")
        if floor := result["noise_floor"]:
            crossed = f"{percent(floor['fidelity_crossed_up'])}/{percent(floor['fidelity_crossed_down'])}"
            scores = (percent(floor["fidelity_ap50"]), percent(floor["fidelity_found"]), crossed)
            print(f"{name:9s} {'fp32 on +-1 grey level (yardstick)':40s} {'-':>9s} {'-':>9s} "
                  "{:>8s} {:>6s} {:>15s} {:>6s} {:>6s}".format(*scores, "-", "-"), flush=True)  # fmt: skip
        if not result["no_fidelity"]:  # a fidelity figure is only as fine as one reference box (1 of 19: 5 points)
            print(f"{name:9s} fidelity scored against {result['reference_boxes']} FP32 detections at >= "
                  f"{args.fidelity_score:g}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
