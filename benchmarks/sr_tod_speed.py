"""SR-TOD speed on this machine, as ratios measured side by side in one run.

1. Faster R-CNN w/ SR-TOD at 800x800 (AI-TOD preset, upstream test settings): onnxruntime CPU
   vs PyTorch eager (issue target: >= 1.3x FPS).
2. The cost of RH + DGFE: the same detector with and without them (same weights otherwise),
   both in onnxruntime, as a latency ratio, beside the multiply-add ratio from ``inspect``.

Usage: python benchmarks/sr_tod_speed.py [--iters 10] [--detector faster_rcnn] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from tod_deploy.backends.onnxruntime_runner import interleaved_calls, load_onnx
from tod_deploy.bench.run import bench_model
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.export.pipeline import export_model
from tod_deploy.inspection import inspect_method
from tod_deploy.models import build_training_model
from tod_deploy.parity.comparator import verification_images


def log(line: str) -> None:
    print(line, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--detector", default="faster_rcnn")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="srtod-bench-"))
    threads = os.cpu_count() or 1
    with_overrides = {"model": {"detector": args.detector}}
    without_overrides = {"model": {"detector": args.detector, "enhance": False}}

    sr = export_model("sr_tod", out, overrides=with_overrides, log=log)
    # The baseline: the SR-TOD weights minus RH / DGFE / threshold (reported as unexpected keys).
    model, _ = build_training_model(sr.sidecar.recipe, None, log=lambda _l: None)
    ckpt = out / "sr_tod.pth"
    torch.save(model.state_dict(), ckpt)
    base = export_model("sr_tod", out, checkpoint=ckpt, overrides=without_overrides, name="baseline", log=log)

    log("1) onnxruntime vs torch eager")
    ort_vs_torch = bench_model(sr.onnx_path, ["torch", "onnxruntime"], iters=args.iters, threads=threads, log=log)

    log("2) with vs without RH + DGFE, both onnxruntime")
    images = verification_images(sr.sidecar.recipe, 1, seed=0)
    models = {"with_rh_dgfe": load_onnx(sr.onnx_path), "without": load_onnx(base.onnx_path)}
    timings = time_interleaved(interleaved_calls(models, images, threads), 1, 2, args.iters, None)
    stats = {name: t.stats() for name, t in timings.items()}
    macs_with = inspect_method("sr_tod", None, with_overrides, None, log=lambda _l: None)["gmacs"]
    macs_without = inspect_method("sr_tod", None, without_overrides, None, log=lambda _l: None)["gmacs"]

    result = {
        "ort_vs_torch": ort_vs_torch.to_dict(),
        "ort_over_torch_fps": ort_vs_torch.ratios()["onnxruntime"],
        "rh_dgfe": stats,
        "latency_ratio_with_over_without": stats["with_rh_dgfe"]["median_ms"] / stats["without"]["median_ms"],
        "gmacs_with": macs_with,
        "gmacs_without": macs_without,
    }
    for name, s in ort_vs_torch.results.items():
        print(f"SR-TOD {args.detector} {name:12s} median {s['median_ms']:8.1f} ms  {s['fps']:6.2f} FPS")
    print(f"onnxruntime / torch FPS                      {result['ort_over_torch_fps']:6.2f}x")
    for name, s in stats.items():
        print(f"{name:14s} onnxruntime median {s['median_ms']:8.1f} ms")
    print(f"latency with / without RH + DGFE             {result['latency_ratio_with_over_without']:6.2f}x")
    print(f"multiply-adds with / without                 {macs_with:.1f} / {macs_without:.1f} G "
          f"= {macs_with / macs_without:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
