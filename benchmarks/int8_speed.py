"""INT8 Q/DQ vs FP32 in onnxruntime CPU, both layouts, measured side by side (interleaved rounds) in one run.

Models (``--only`` picks some): ThumbDet 4x, SR-TOD Faster R-CNN, BH (BH-ResNet50) Faster R-CNN, CFINet and
1-bit DFR-Det FCOS, at ``--size`` (default 800x800; ThumbDet at its recipe's 800x1333 unless --size).
Each is exported once (seeded weights, or ``--checkpoints DIR`` holding ``<model>.pth`` from
benchmarks/train_synthetic.py), quantized with ``tod-deploy quantize --precision int8 --target T`` for each
``--targets`` layout (calibration/photos, max), and the FP32 file and every INT8 file are timed in
alternating rounds (tod_deploy.bench.timing.time_interleaved). The CPU is named in the output.

Why a ratio is what it is: onnxruntime runs a DequantizeLinear -> op -> QuantizeLinear group as one
integer kernel (QLinearConv, QLinearAdd, ...) only when its graph optimizer recognizes the group; every
Q/DQ left over is extra float work, and float ops between layers (the TensorRT layout leaves them float)
cost a DequantizeLinear/QuantizeLinear pair each. The script lists, per file, the op types of
onnxruntime's *optimized* graph and, with --profile (or a ratio under 1.3x), the time per op type.

Usage: python benchmarks/int8_speed.py [--only thumbdet,sr_tod,bh,cfinet,dfr_det] [--targets onnxruntime,tensorrt]
                                       [--size 800x800] [--iters 10] [--warmup 2] [--threads N]
                                       [--checkpoints DIR] [--profile] [--out DIR] [--json FILE]
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

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends.onnxruntime_runner import interleaved_calls
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.environment import environment
from tod_deploy.export.pipeline import export_model
from tod_deploy.parity.comparator import verification_images
from tod_deploy.quant.pipeline import quantize_model


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def plain_options(path: Path):
    """Session options that also run tod::BinaryConv2d nodes (their custom-op library registered)."""
    import onnxruntime as ort

    from tod_deploy.ops.ort_binary_conv import session_options, uses_binary_conv

    binary = uses_binary_conv(onnx.load(str(path), load_external_data=False))
    return session_options() if binary else ort.SessionOptions()


def optimized_ops(path: Path, threads: int, workdir: Path) -> Counter:
    """Op types of the graph onnxruntime actually runs (after its QDQ fusions)."""
    import onnxruntime as ort

    options = plain_options(path)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(workdir / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def profile_by_op(path: Path, images, threads: int, runs: int, workdir: Path) -> dict[str, float]:
    """Milliseconds per run spent in each op type (onnxruntime's profiler, node events)."""
    import onnxruntime as ort

    options = plain_options(path)
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


# name -> (method, export overrides); --size replaces input_size (ThumbDet keeps its recipe size otherwise)
MODELS = {
    "thumbdet": ("thumbdet", {}),
    "sr_tod": ("sr_tod", {"model": {"detector": "faster_rcnn"}}),
    "bh": ("bh", {"model": {"backbone": "bh_resnet50", "detector": "faster_rcnn"}}),
    "cfinet": ("cfinet", {}),
    "dfr_det": ("dfr_det", {"model": {"detector": "fcos"}}),
}
KEYS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul", "QLinearConcat",
        "QLinearAveragePool", "QLinearSigmoid", "Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm",
        "QuantizeLinear", "DequantizeLinear", "BinaryConv2d")  # fmt: skip


def measure(name: str, fp32_path: Path, args: argparse.Namespace, workdir: Path) -> list[dict]:
    """One row per INT8 layout: FPS of FP32 and INT8 timed in alternating rounds, the optimized graph's ops."""
    files, info = {"fp32": fp32_path}, {}
    for target in args.targets.split(","):
        t0 = time.perf_counter()
        out = fp32_path.with_name(f"{fp32_path.stem}.int8-{target}.onnx")
        result = quantize_model(fp32_path, "int8", target=target, output=out, log=log, show_progress=False)
        files[target] = result.output
        info[target] = {"quantize_seconds": round(time.perf_counter() - t0, 1), "comparison": result.comparison}
    sidecar = json.loads(fp32_path.with_suffix(".json").read_text())
    images = verification_images(Sidecar(sidecar).recipe, 1, seed=1)
    calls = interleaved_calls({key: onnx.load(str(path)) for key, path in files.items()}, images, args.threads)
    stats = {k: t.stats() for k, t in time_interleaved(calls, 1, args.warmup, args.iters, None).items()}
    ops = {key: optimized_ops(path, args.threads, workdir) for key, path in files.items()}
    rows = []
    for target in info:
        detections = info[target]["comparison"].detections
        row = {
            "model": name,
            "layout": target,
            "input": list(sidecar["recipe"]["input_size"]),
            "quantize_seconds": info[target]["quantize_seconds"],
            "fp32": stats["fp32"],
            "int8": stats[target],
            "fps_ratio_int8_over_fp32": stats[target]["fps"] / stats["fp32"]["fps"],
            "detections_matched": None if detections is None else detections.matched_fraction(),
            "optimized_graph_ops": {
                "fp32": {k: ops["fp32"][k] for k in KEYS if ops["fp32"][k]},
                "int8": {k: ops[target][k] for k in KEYS if ops[target][k]},
            },
        }
        if args.profile or row["fps_ratio_int8_over_fp32"] < 1.3:
            row["profile_ms_per_run"] = {
                "fp32": profile_by_op(fp32_path, images, args.threads, 2, workdir),
                "int8": profile_by_op(files[target], images, args.threads, 2, workdir),
            }
        rows.append(row)
    return rows


def print_row(r: dict) -> None:
    h, w = r["input"]
    matched = "-" if r["detections_matched"] is None else f"{100 * r['detections_matched']:.0f}%"
    print(
        f"{r['model']:<9} {r['layout']:<12} {h}x{w:<5} fp32 {r['fp32']['median_ms']:8.1f} ms  "
        f"int8 {r['int8']['median_ms']:8.1f} ms  ratio {r['fps_ratio_int8_over_fp32']:.2f}x  "
        f"detections matched {matched}"
    )
    print(f"    onnxruntime's optimized graph: fp32 {r['optimized_graph_ops']['fp32']}")
    print(f"                                   int8 {r['optimized_graph_ops']['int8']}")
    if "profile_ms_per_run" in r:
        for precision in ("fp32", "int8"):
            top = list(r["profile_ms_per_run"][precision].items())[:8]
            print(f"    profile {precision} (ms/run): " + ", ".join(f"{op} {ms:.0f}" for op, ms in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--targets", default="onnxruntime,tensorrt")
    parser.add_argument("--size", default=None, help="HxW for every model (default 800x800, ThumbDet its recipe's)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="Folder of <model>.pth trained with MODELS' settings (bh here is BH-ResNet50 Faster "
                        "R-CNN: train_synthetic.py's bh_frcnn, not its bh).")
    parser.add_argument("--profile", action="store_true", help="Profile by op type whatever the ratio.")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="int8-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {environment()['cpu']}, {args.threads} threads, onnxruntime {ort_version()}")
    rows = []
    for name in args.only.split(","):
        method, overrides = MODELS[name]
        size = args.size or (None if name == "thumbdet" else "800x800")
        overrides = {**overrides, **({"input_size": size} if size else {})}
        checkpoint = args.checkpoints / f"{name}.pth" if args.checkpoints else None
        log(f"export {name} ...")
        export = export_model(method, out, checkpoint, overrides=overrides, verify=False, name=name, log=log)
        rows += measure(name, export.onnx_path, args, out)
        for row in rows[-len(args.targets.split(",")) :]:
            print_row(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        log(f"wrote {args.json}")


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
