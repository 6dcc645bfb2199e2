"""DFR-Det end to end: 1-bit FCOS R18 vs real-valued FCOS R18, both in onnxruntime CPU, one run.

Issue 4 target: >= 2.5x FPS (aiming at 3.5x). Also reports where the 1-bit model's time goes,
per ONNX op type, from onnxruntime's own profiler (tod::BinaryConv2d nodes run the compiled
kernel through onnxruntime-extensions' hook).

Usage: python benchmarks/dfr_det_speed.py [--iters 10] [--size 800x800] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner, load_onnx
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.export.pipeline import export_model
from tod_deploy.ops.ort_binary_conv import BinaryConvSession, session_options
from tod_deploy.parity.comparator import verification_images


def log(line: str) -> None:
    print(line, file=sys.stderr)


def profile_by_op(path: Path, images: object, threads: int, runs: int = 3) -> dict[str, float]:
    """Milliseconds per inference spent in each op type, from onnxruntime's profiler."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    session = BinaryConvSession(str(path), session_options(options), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(runs):
        session.run(None, {name: images})
    trace = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000.0 / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--size", default="800x800")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dfr-bench-"))
    threads = os.cpu_count() or 1
    overrides = {"input_size": args.size}
    one_bit = export_model("dfr_det", out, overrides=overrides, log=log)
    real = export_model("dfr_det", out, variant="real", overrides=overrides, log=log)
    images = verification_images(one_bit.sidecar.recipe, 1, seed=0)
    runners = {
        "1-bit (plugin)": OnnxRuntimeRunner(load_onnx(one_bit.onnx_path), threads),
        "real-valued": OnnxRuntimeRunner(load_onnx(real.onnx_path), threads),
    }
    timings = time_interleaved({k: (lambda r=r: r.run(images)) for k, r in runners.items()}, 1, 2, args.iters, None)
    stats = {name: t.stats() for name, t in timings.items()}
    ratio = stats["1-bit (plugin)"]["fps"] / stats["real-valued"]["fps"]
    ops = profile_by_op(one_bit.onnx_path, images, threads)
    for name, s in stats.items():
        print(f"{name:16s} onnxruntime median {s['median_ms']:8.1f} ms  {s['fps']:6.2f} FPS")
    print(f"1-bit / real-valued FPS            {ratio:6.2f}x")
    total = sum(ops.values())
    print("1-bit model, time per op type (onnxruntime profiler):")
    for op, ms in list(ops.items())[:8]:
        print(f"  {op:22s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"stats": stats, "fps_ratio": ratio, "ops_ms": ops}, indent=2) + "\n")


if __name__ == "__main__":
    main()
