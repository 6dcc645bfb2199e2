"""Bottom-heavy backbones on this machine, as ratios measured side by side in one run.

1. BH-ResNet50 Faster R-CNN at 640x512: onnxruntime CPU vs PyTorch eager (issue 5 target >= 1.3x).
2. BH-ResNet50 vs ResNet50, backbone alone, both onnxruntime at 640x512: equal multiply-adds,
   different shapes (more work at high resolution, fewer channels) - where does the time go?

Usage: python benchmarks/bh_speed.py [--iters 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from tod_deploy.bench.run import bench_model
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.export.pipeline import export_model
from tod_deploy.nn.backbones.bottom_heavy import build_backbone
from tod_deploy.nn.backbones.resnet import fold_batchnorm
from tod_deploy.runtimes import OnnxRuntimeRunner


def log(line: str) -> None:
    print(line, file=sys.stderr)


def backbone_onnx(name: str, h: int, w: int) -> onnx.ModelProto:
    model = build_backbone(name).eval()
    fold_batchnorm(model)
    program = torch.onnx.export(model, (torch.zeros(1, 3, h, w),), dynamo=True, opset_version=18, verbose=False)
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, 10)
    return proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    out = Path(tempfile.mkdtemp(prefix="bh-bench-"))
    overrides = {"input_size": "512x640", "model": {"backbone": "bh_resnet50", "detector": "faster_rcnn"}}
    detector = export_model("bh", out, overrides=overrides, log=log)
    log("1) onnxruntime vs torch eager, BH-ResNet50 Faster R-CNN at 640x512")
    report = bench_model(detector.onnx_path, ["torch", "onnxruntime"], iters=args.iters, threads=threads, log=log)

    log("2) backbones alone in onnxruntime")
    images = np.random.default_rng(0).random((1, 3, 512, 640), dtype=np.float32)
    runners = {name: OnnxRuntimeRunner(backbone_onnx(name, 512, 640), threads) for name in ("bh_resnet50", "resnet50")}
    timings = time_interleaved({k: (lambda r=r: r.run(images)) for k, r in runners.items()}, 1, 2, args.iters, None)
    stats = {name: t.stats() for name, t in timings.items()}
    ratio = stats["bh_resnet50"]["median_ms"] / stats["resnet50"]["median_ms"]
    for name, s in report.results.items():
        print(f"BH-ResNet50 Faster R-CNN {name:12s} median {s['median_ms']:8.1f} ms  {s['fps']:6.2f} FPS")
    print(f"onnxruntime / torch FPS                     {report.ratios()['onnxruntime']:6.2f}x")
    for name, s in stats.items():
        print(f"backbone {name:12s} onnxruntime median {s['median_ms']:7.1f} ms")
    print(f"BH-ResNet50 / ResNet50 backbone latency     {ratio:6.2f}x (equal multiply-adds: 26.7 G)")
    if args.json:
        args.json.write_text(json.dumps({"ort_vs_torch": report.to_dict(), "backbones": stats, "latency_ratio": ratio},
                                        indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
