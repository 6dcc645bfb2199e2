"""ThumbDet speed on this machine, as ratios measured side by side in one run.

1. The 4x student at 800x1333: onnxruntime CPU vs PyTorch eager (issue target: >= 1.3x FPS).
2. The 4x student vs Deformable-DETR at full resolution with the same weights (the 1x variant,
   loaded from the 4x checkpoint minus its down-sampler), both in onnxruntime (target >= 8x;
   the paper's multiply-add ratio is 12.9x, its GPU FPS ratio 1.26x).
3. Wall time of the whole export (target < 90 s on 2 cores).

Usage: python benchmarks/thumbdet_speed.py [--iters 20] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends.onnxruntime_runner import interleaved_calls, load_onnx
from tod_deploy.bench.run import bench_model
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.export.pipeline import export_model
from tod_deploy.models import build_training_model
from tod_deploy.parity.comparator import verification_images


def log(line: str) -> None:
    print(line, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="thumbdet-bench-"))
    threads = os.cpu_count() or 1

    start = time.perf_counter()
    small = export_model("thumbdet", out, log=log)
    export_seconds = time.perf_counter() - start

    # Same Deformable-DETR weights at full resolution: the 4x student's state dict as a checkpoint.
    student, _ = build_training_model(Sidecar.load(small.onnx_path).recipe, None, log=lambda _l: None)
    ckpt = out / "thumbdet_student.pth"
    torch.save({"model": student.student.state_dict()}, ckpt)
    full = export_model("thumbdet", out, checkpoint=ckpt, variant="1x", log=log)

    log("1) onnxruntime vs torch eager, ThumbDet 4x at 800x1333")
    ort_vs_torch = bench_model(small.onnx_path, ["torch", "onnxruntime"], iters=args.iters, threads=threads, log=log)

    log("2) thumbnail (4x) vs full resolution (1x), both onnxruntime")
    images = verification_images(small.sidecar.recipe, 1, seed=0)
    models = {"thumbdet_4x": load_onnx(small.onnx_path), "deformable_detr_1x": load_onnx(full.onnx_path)}
    timings = time_interleaved(interleaved_calls(models, images, threads), 1, 2, max(args.iters // 2, 3), None)
    stats = {name: t.stats() for name, t in timings.items()}

    result = {
        "export_seconds": export_seconds,
        "ort_vs_torch": ort_vs_torch.to_dict(),
        "ort_over_torch_fps": ort_vs_torch.ratios()["onnxruntime"],
        "thumbnail_vs_full": stats,
        "thumbnail_over_full_fps": stats["thumbdet_4x"]["fps"] / stats["deformable_detr_1x"]["fps"],
        "threads": threads,
    }
    print(f"export wall time                         {export_seconds:6.1f} s")
    for name, s in ort_vs_torch.results.items():
        print(f"4x {name:12s} median {s['median_ms']:7.1f} ms  p90 {s['p90_ms']:7.1f} ms  {s['fps']:6.2f} FPS")
    print(f"onnxruntime / torch FPS                  {result['ort_over_torch_fps']:6.2f}x")
    for name, s in stats.items():
        print(f"{name:20s} onnxruntime median {s['median_ms']:8.1f} ms  {s['fps']:6.2f} FPS")
    print(f"thumbnail / full-resolution FPS          {result['thumbnail_over_full_fps']:6.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
