"""Bottom-heavy backbones on this machine, as ratios measured side by side in one run.

1. BH-ResNet50 Faster R-CNN at 640x512: onnxruntime CPU vs PyTorch eager (issue 5 target >= 1.3x).
2. BH-ResNet50 vs ResNet50, backbone alone, both onnxruntime at 640x512: equal multiply-adds,
   different shapes (more work at high resolution, fewer channels) - where does the time go?
3. The answer: onnxruntime's profiler, Conv time per output stride (4/8/16/32) beside the
   multiply-adds done there, so each stride's efficiency (G multiply-adds per second) shows.

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

from tod_deploy.backends.onnxruntime_runner import interleaved_calls
from tod_deploy.bench.run import bench_model
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.export.pipeline import export_model
from tod_deploy.nn.backbones.bottom_heavy import build_backbone
from tod_deploy.nn.backbones.resnet import fold_batchnorm


def log(line: str) -> None:
    print(line, file=sys.stderr)


def backbone_onnx(name: str, h: int, w: int) -> onnx.ModelProto:
    model = build_backbone(name).eval()
    fold_batchnorm(model)
    program = torch.onnx.export(model, (torch.zeros(1, 3, h, w),), dynamo=True, opset_version=18, verbose=False)
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, 10)
    return proto


def conv_profile(model: onnx.ModelProto, images: np.ndarray, threads: int, runs: int) -> dict[int, dict[str, float]]:
    """Per output stride: Conv milliseconds per run (onnxruntime profiler) and multiply-adds."""
    import onnxruntime as ort

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    macs_by_node = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.output[0] in shapes:
            _, c_out, h, w = shapes[node.output[0]]
            _, c_in, kh, kw = weights[node.input[1]]
            macs_by_node[node.name] = (images.shape[2] // h, c_out * h * w * c_in * kh * kw)
    options = ort.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads = True, threads
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(runs):
        session.run(None, {name: images})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_stride: dict[int, dict[str, float]] = {}
    for stride, macs in macs_by_node.values():
        per_stride.setdefault(stride, {"ms": 0.0, "gmacs": 0.0})["gmacs"] += macs / 1e9
    # onnxruntime renames the Conv nodes it fuses (Conv+ReLU, NCHWc blocking): find each one's
    # stride from its output shape instead of its name
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or args.get("op_name") not in ("Conv", "FusedConv"):
            continue
        dims = next(iter(args["output_type_shape"][0].values()))
        stride = images.shape[2] // dims[2]
        per_stride.setdefault(stride, {"ms": 0.0, "gmacs": 0.0})["ms"] += event["dur"] / 1000 / runs
    return dict(sorted(per_stride.items()))


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
    protos = {name: backbone_onnx(name, 512, 640) for name in ("bh_resnet50", "resnet50")}
    timings = time_interleaved(interleaved_calls(protos, images, threads), 1, 2, args.iters, None)
    stats = {name: t.stats() for name, t in timings.items()}
    ratio = stats["bh_resnet50"]["median_ms"] / stats["resnet50"]["median_ms"]
    log("3) Conv time per output stride (onnxruntime profiler)")
    profiles = {name: conv_profile(proto, images, threads, args.iters) for name, proto in protos.items()}
    for name, s in report.results.items():
        print(f"BH-ResNet50 Faster R-CNN {name:12s} median {s['median_ms']:8.1f} ms  {s['fps']:6.2f} FPS")
    print(f"onnxruntime / torch FPS                     {report.ratios()['onnxruntime']:6.2f}x")
    for name, s in stats.items():
        print(f"backbone {name:12s} onnxruntime median {s['median_ms']:7.1f} ms")
    print(f"BH-ResNet50 / ResNet50 backbone latency     {ratio:6.2f}x (equal multiply-adds: 26.7 G)")
    for name, profile in profiles.items():
        for stride, p in profile.items():
            rate = p["gmacs"] / (p["ms"] / 1000) if p["ms"] else float("nan")
            print(f"{name:12s} stride {stride:2d}: Conv {p['ms']:7.1f} ms  {p['gmacs']:6.2f} G  {rate:6.1f} G/s")
    if args.json:
        result = {"ort_vs_torch": report.to_dict(), "backbones": stats, "latency_ratio": ratio}
        result["conv_by_stride"] = profiles
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
