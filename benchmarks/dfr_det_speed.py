"""DFR-Det end to end: 1-bit R18 detectors vs their real-valued R18 twins, in onnxruntime CPU, one run.

Per detector (FCOS, RetinaNet, Faster R-CNN), interleaved: the 1-bit export as written by default
(the residual Add and PReLU fused into each tod::BinaryConv2d node), the same with
``--binary-conv plugin-unfused``, and the real-valued model, each as tod-deploy runs it (onnxruntime
for the float parts, the compiled kernel between them: ``tod_deploy.ops.ort_segments``); and the
default export in one InferenceSession with onnxruntime-extensions' hook, as a user's own session
runs it (``tod_deploy.ops.ort_binary_conv``). Issue 15 target for FCOS: >= 3.5x FPS (floor 3.2x).
Also reports where the fused 1-bit model's time goes, per ONNX op type, from onnxruntime's own
profiler of each part and the kernel's calls.

Usage: python benchmarks/dfr_det_speed.py [--iters 10] [--size 800x800] [--detectors fcos,retinanet,faster_rcnn]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

from tod_deploy.backends.onnxruntime_runner import interleaved_calls, load_onnx
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.export.pipeline import export_model
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.ops.ort_binary_conv import BinaryConvSession, session_options
from tod_deploy.ops.ort_segments import SegmentedSession
from tod_deploy.parity.comparator import verification_images


def log(line: str) -> None:
    print(line, file=sys.stderr)


def ort_options(threads: int, profile: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.enable_profiling = profile
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def profile_by_op(path: Path, images: object, threads: int, runs: int = 3) -> dict[str, float]:
    """Milliseconds per inference spent in each op type, from onnxruntime's profiler (and the kernel's calls),
    over ``runs`` runs after a first one (its page faults and thread starts are not the model's)."""
    session = SegmentedSession(load_onnx(path), ort_options(threads, profile=True))
    name = session.get_inputs()[0].name
    for _ in range(1 + runs):
        session.run(None, {name: images})
    trace_file = Path(session.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    totals: dict[str, float] = defaultdict(float)
    first_run: set[str] = set()
    for event in trace:  # each node runs once per run, and a node's events are in run order
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            if event["name"] not in first_run:
                first_run.add(event["name"])
                continue
            totals[event["args"]["op_name"]] += event["dur"] / 1000.0 / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def bench_detector(detector: str, out: Path, args: argparse.Namespace, threads: int) -> dict[str, object]:
    """One detector: 1-bit (fused, default export), 1-bit unfused, real-valued, interleaved; op table of the fused."""
    overrides = {"input_size": args.size, "model": {"detector": detector}}
    verify = not args.no_verify
    exports = {
        "1-bit fused": export_model("dfr_det", out / detector, overrides=overrides, verify=verify, log=log),
        "1-bit unfused": export_model(
            "dfr_det", out / detector, overrides={**overrides, "binary_conv": "plugin-unfused"},
            name=f"dfr_det_{detector}_unfused", verify=verify, log=log,
        ),
        "real-valued": export_model(
            "dfr_det", out / detector, variant="real", overrides=overrides, verify=verify, log=log
        ),
    }  # fmt: skip
    images = verification_images(exports["1-bit fused"].sidecar.recipe, 1, seed=0)
    calls = interleaved_calls({name: load_onnx(result.onnx_path) for name, result in exports.items()}, images, threads)
    hooked = BinaryConvSession(str(exports["1-bit fused"].onnx_path), session_options(ort_options(threads)))
    feed = {hooked.get_inputs()[0].name: images}
    calls["1-bit hook"] = lambda: hooked.run(None, feed)  # one session, onnxruntime-extensions' hook
    timings = time_interleaved(calls, 1, 2, args.iters, None)
    stats = {name: t.stats() for name, t in timings.items()}
    ops = profile_by_op(exports["1-bit fused"].onnx_path, images, threads)
    real_fps = stats["real-valued"]["fps"]
    print(f"\n{detector} at {args.size}:")
    for name, st in stats.items():
        line = f"  {name:14s} onnxruntime median {st['median_ms']:8.1f} ms  {st['fps']:6.2f} FPS"
        print(line + (f"  {st['fps'] / real_fps:5.2f}x real-valued" if name != "real-valued" else ""))
    gain = stats["1-bit unfused"]["median_ms"] / stats["1-bit fused"]["median_ms"]
    print(f"  fusion gain (unfused / fused latency) {gain:.2f}x")
    total = sum(ops.values())
    print("  (1-bit hook: the fused export in one onnxruntime session with onnxruntime-extensions' hook)")
    print("  1-bit fused model, time per op type (onnxruntime profiler; BinaryConv2d: the kernel's calls):")
    for op, ms in list(ops.items())[:8]:
        print(f"    {op:22s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    return {"stats": stats, "fps_ratio": stats["1-bit fused"]["fps"] / real_fps, "ops_ms": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--size", default="800x800")
    parser.add_argument("--detectors", default="fcos,retinanet,faster_rcnn")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-verify", action="store_true", help="skip export verification (the tests verify)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dfr-bench-"))
    threads = os.cpu_count() or 1
    print(f"CPU: {cpu_name()}; {threads} threads; tod::BinaryConv2d ISA path {binary_conv_cpu.current_isa()}")
    results = {detector: bench_detector(detector, out, args, threads) for detector in args.detectors.split(",")}
    if "fcos" in results:
        ratio = results["fcos"]["fps_ratio"]
        print(f"\nFCOS 1-bit / real-valued FPS {ratio:.2f}x (target >= 3.5x, floor 3.2x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
