"""INT8 Q/DQ vs FP32 in onnxruntime CPU, measured side by side (interleaved rounds) in one run.

Models: ThumbDet 4x at the recipe's size (800x1333) and SR-TOD Faster R-CNN (AI-TOD preset,
800x800 by default; --sr-tod-size to change). Each is exported with seeded weights, quantized with
`tod-deploy quantize --precision int8` defaults (calibration/photos, max, stem and head ends in FP32),
then both files are timed in alternating rounds (tod_deploy.bench.timing.time_interleaved).

Why the ratio is what it is: onnxruntime runs a DequantizeLinear -> Conv -> QuantizeLinear group as
one integer QLinearConv only when its graph optimizer recognizes the pattern; every Q/DQ left over
is extra float work. The script lists, per model, the op types of onnxruntime's *optimized* graph
(QLinearConv / QLinearMatMul counts vs remaining float Conv/MatMul and Q/DQ) and, with --profile,
the time per op type from onnxruntime's profiler.

Usage: python benchmarks/int8_speed.py [--iters 10] [--warmup 2] [--threads N] [--sr-tod-size 800x800]
                                       [--only thumbdet|sr_tod] [--profile] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import onnx

from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.export.pipeline import export_model
from tod_deploy.parity.comparator import verification_images
from tod_deploy.quant.pipeline import quantize_model


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def optimized_ops(path: Path, threads: int, workdir: Path) -> Counter:
    """Op types of the graph onnxruntime actually runs (after its QDQ fusions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(workdir / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def profile_by_op(path: Path, images, threads: int, runs: int, workdir: Path) -> dict[str, float]:
    """Milliseconds per run spent in each op type (onnxruntime's profiler, node events)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"profile_{path.stem}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: images})  # warm-up, dropped below by averaging over runs+1 anyway
    for _ in range(runs):
        session.run(None, {name: images})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000.0
    return {op: ms / (runs + 1) for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}


def measure(name: str, fp32_path: Path, args: argparse.Namespace, threads: int, workdir: Path) -> dict:
    t0 = time.perf_counter()
    result = quantize_model(fp32_path, "int8", log=log, show_progress=False)
    quantize_s = time.perf_counter() - t0
    sidecar = json.loads(fp32_path.with_suffix(".json").read_text())
    images = verification_images(sidecar.recipe, 1, seed=1)
    fp32 = OnnxRuntimeRunner(onnx.load(str(fp32_path)), threads)
    int8 = OnnxRuntimeRunner(onnx.load(str(result.output)), threads)
    timings = time_interleaved(
        {"fp32": lambda: fp32.run(images), "int8": lambda: int8.run(images)}, 1, args.warmup, args.iters, None
    )
    stats = {k: t.stats() for k, t in timings.items()}
    ratio = stats["int8"]["fps"] / stats["fp32"]["fps"]
    ops_fp32, ops_int8 = optimized_ops(fp32_path, threads, workdir), optimized_ops(result.output, threads, workdir)
    keys = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "Conv", "MatMul", "FusedConv", "FusedMatMul")
    keys += ("QuantizeLinear", "DequantizeLinear", "QGemm", "Gemm")
    out = {
        "model": name,
        "input": list(sidecar.recipe.input_size),
        "quantize_seconds": round(quantize_s, 1),
        "fp32": stats["fp32"],
        "int8": stats["int8"],
        "fps_ratio_int8_over_fp32": ratio,
        "optimized_graph_ops": {
            "fp32": {k: ops_fp32[k] for k in keys if ops_fp32[k]},
            "int8": {k: ops_int8[k] for k in keys if ops_int8[k]},
        },
        "comparison": result.comparison.to_dict(),
    }
    if args.profile or ratio < 1.5:
        out["profile_ms_per_run"] = {
            "fp32": profile_by_op(fp32_path, images, threads, 2, workdir),
            "int8": profile_by_op(result.output, images, threads, 2, workdir),
        }
    return out


def print_row(r: dict) -> None:
    h, w = r["input"]
    print(
        f"{r['model']:<24} {h}x{w:<6} fp32 {r['fp32']['fps']:6.2f} FPS ({r['fp32']['median_ms']:7.1f} ms)  "
        f"int8 {r['int8']['fps']:6.2f} FPS ({r['int8']['median_ms']:7.1f} ms)  "
        f"ratio {r['fps_ratio_int8_over_fp32']:.2f}x"
    )
    print(f"    onnxruntime's optimized graph: fp32 {r['optimized_graph_ops']['fp32']}")
    print(f"                                   int8 {r['optimized_graph_ops']['int8']}")
    if "profile_ms_per_run" in r:
        for precision in ("fp32", "int8"):
            top = list(r["profile_ms_per_run"][precision].items())[:8]
            print(f"    profile {precision} (ms/run): " + ", ".join(f"{op} {ms:.0f}" for op, ms in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sr-tod-size", default="800x800")
    parser.add_argument("--only", choices=("thumbdet", "sr_tod"), default=None)
    parser.add_argument("--profile", action="store_true", help="Profile by op type even when the ratio is >= 1.5x.")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="int8-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.only in (None, "thumbdet"):
        log("export ThumbDet 4x (recipe size) ...")
        thumbdet = export_model("thumbdet", out, verify=False, log=log)
        rows.append(measure("ThumbDet 4x", thumbdet.onnx_path, args, args.threads, out))
        print_row(rows[-1])
    if args.only in (None, "sr_tod"):
        log(f"export SR-TOD Faster R-CNN ({args.sr_tod_size}) ...")
        overrides = {"input_size": args.sr_tod_size, "model": {"detector": "faster_rcnn"}}
        sr_tod = export_model("sr_tod", out, overrides=overrides, verify=False, log=log)
        rows.append(measure("SR-TOD Faster R-CNN", sr_tod.onnx_path, args, args.threads, out))
        print_row(rows[-1])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
