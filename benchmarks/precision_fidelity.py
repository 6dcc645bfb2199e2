"""Reduced precision, measured: FP16 and INT8 exports of every method against their FP32 export.

For each method: export (FP32), ``quantize --precision fp16`` and ``--precision int8`` (calibrated on
calibration/photos), then ``eval`` over a synthetic tiny-object set with the FP16 and INT8 files as
extra rows and ``--fidelity``: each row scored against the FP32 onnxruntime row's detections as
ground truth (same weights, so this is what the precision change alone costs; random weights make
the labels meaningless but not the agreement). Also the onnxruntime latency per image of each row,
as measured during eval (one pass, not a benchmark). Issue 7 asks FP16 AP50 >= 0.98, INT8 >= 0.90.

Usage: python benchmarks/precision_fidelity.py [--methods thumbdet,sr_tod,...] [--images 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# method -> extra export flags (the recipes' default sizes unless noted)
METHODS = {
    "thumbdet": [],
    "sr_tod": ["--detector", "faster_rcnn"],
    "dfr_det": ["--detector", "fcos"],
    "cfinet": [],
    "bh": ["--backbone", "bh_resnet50", "--detector", "faster_rcnn"],
}


def run(*args: str) -> None:
    print("$ tod-deploy " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "tod_deploy.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--fidelity-score", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fidelity-"))
    data = out / "synthetic"
    if not (data / "annotations.json").is_file():
        run("make-dataset", "synthetic", "--out", str(data), "--images", str(args.images), "--seed", "7")
    summary = {}
    for method in args.methods.split(","):
        folder = out / method
        run("export", "--method", method, *METHODS[method], "--output", str(folder), "--name", method)
        fp32 = folder / f"{method}.onnx"
        run("quantize", str(fp32), "--precision", "fp16", "--json", str(folder / "fp16.json"))
        run("quantize", str(fp32), "--precision", "int8", "--json", str(folder / "int8.json"))
        report = folder / "eval.json"
        run("eval", str(fp32), "--data", str(data / "annotations.json"), "--images", str(data / "images"),
            "--class-agnostic", "--compare", str(folder / f"{method}.fp16.onnx"),
            "--compare", str(folder / f"{method}.int8.onnx"), "--fidelity", "--fidelity-score",
            str(args.fidelity_score), "--json", str(report))  # fmt: skip
        result = json.loads(report.read_text())
        summary[method] = {
            "fidelity": {row: {k: m[k] for k in ("AP", "AP50", "AP75")} for row, m in
                         result["fidelity"]["results"].items()},
            "reference_objects": next(iter(result["fidelity"]["results"].values()))["counts"]["ground_truth"],
            "seconds": result["seconds"],
            "quantize": {p: json.loads((folder / f"{p}.json").read_text()) for p in ("fp16", "int8")},
        }  # fmt: skip
    print(f"{'method':10s} {'row':24s} {'AP50':>7s} {'AP':>7s}  s/img (FP32 onnxruntime {'':>1s})")
    for method, s in summary.items():
        base = s["seconds"].get("onnxruntime", 0.0)
        for row, m in s["fidelity"].items():
            print(f"{method:10s} {row:24s} {100 * m['AP50']:6.1f}% {100 * m['AP']:6.1f}%  "
                  f"{s['seconds'][row] / args.images:.3f} (FP32 {base / args.images:.3f}), "
                  f"{s['reference_objects']} reference boxes")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
