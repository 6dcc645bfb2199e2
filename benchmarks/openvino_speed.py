"""OpenVINO (CPU) vs onnxruntime (CPU) on the same exports, measured side by side (interleaved rounds) in one run.

Three parts (issue 17, section 3); the CPU, the thread count and the OpenVINO version head each table.

1. Methods (``--only`` picks some): ThumbDet, SR-TOD Faster R-CNN, BH (BH-ResNet50) Faster R-CNN, CFINet and
   1-bit DFR-Det FCOS, each exported once at ``--size`` (seeded weights, or ``--checkpoints DIR/<name>.pth``
   when that file exists) and quantized to INT8 for onnxruntime (``--no-int8`` skips it). Timed in
   alternating rounds (tod_deploy.bench.timing.time_interleaved): onnxruntime FP32, onnxruntime INT8,
   OpenVINO fp32 and OpenVINO auto, its own CPU default (bfloat16 where the CPU has native BF16; on a CPU
   without it auto runs float32, the same as the fp32 row, so that row is skipped and the table says so).
   FPS comes from the median latency; ``x ort`` is each row's FPS over onnxruntime FP32's. Fidelity: each
   row's AP50 against the onnxruntime FP32 row's detections at or above ``--fidelity-score``, taken as
   ground truth (``tod-deploy eval --fidelity``, class-agnostic) over ``--images`` synthetic images drawn at
   the model's input size; "ref" is the reference row, "n/a" means it had no detection that confident.
   Why the ratios are what they are: OpenVINO's CPU plugin fuses convolutions with their bias and
   activations, picks blocked memory layouts per layer and reorders only between them, where onnxruntime
   runs NCHW kernels; the INT8 file is laid out for onnxruntime's QLinear kernels, so it is timed there
   only. The 1-bit layers run on OpenVINO's native BinaryConvolution (the table's notes count them).
2. One 1-bit layer at the four ResNet-18 stage shapes (Cin = Cout, 3x3, stride 1, pad 1, batch 1,
   zero_sign -1, pad_value 0; ``--layers-only`` / ``--no-layers``), interleaved per shape: our kernel as
   a ``tod::BinaryConv2d`` node in onnxruntime, our kernel alone (binary_conv_cpu, output array reused),
   the same one-node model in OpenVINO end to end (FakeQuantize -> BinaryConvolution, with the reorders
   around them), OpenVINO's BinaryConvolution node alone (its ``real_time`` in the per-node profile of a
   second compiled copy with PERF_COUNT on, median over the timed runs; ``ov rest`` is every other node of
   that profile), and OpenVINO's float32 Convolution of the same shape. Ratios: the float conv's time over
   each 1-bit variant's, and OpenVINO's kernel over ours (> 1: ours is faster); rates in binary GMAC/s
   (Cin*Cout*9*H*W / time). Why OpenVINO end to end is far slower than its kernel: on OpenVINO 2026.4 the
   binarization (FakeQuantize, float in, bits out) runs as a node of its own, followed by a Reorder of
   the bits into the kernel's NHWC layout and another of the result back to NCHW; ours binarizes inside
   the kernel.
3. 1-bit DFR-Det FCOS (the plugin export of part 1, exported here when dfr_det is not in ``--only``):
   on onnxruntime vs on OpenVINO (goal >= 6x), and OpenVINO's 1-bit FPS over the fastest real-valued FCOS
   (``--variant real``; checkpoint ``dfr_det_real.pth``) across onnxruntime FP32, OpenVINO fp32 and auto
   (goal >= 3x), all timed in the same interleaved rounds. Skipped with ``--layers-only``.

Usage: python benchmarks/openvino_speed.py [--only thumbdet,sr_tod,bh,cfinet,dfr_det] [--size 512x512]
                                           [--iters 10] [--warmup 2] [--threads 2] [--no-int8]
                                           [--layers-only | --no-layers] [--images 4] [--fidelity-score 0.05]
                                           [--checkpoints DIR] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends import ExportSource, Runner, RunnerOptions, open_runner
from tod_deploy.backends.openvino_runner import OpenVINORunner, require_openvino
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.environment import environment, installed_version
from tod_deploy.errors import UserError
from tod_deploy.evaluation.run import evaluate_model, score_fidelity
from tod_deploy.evaluation.synthetic import ANNOTATIONS, IMAGES, generate_synthetic
from tod_deploy.export.pipeline import export_model
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.ops.binary_conv_cases import RESNET18_STAGES
from tod_deploy.ops.binary_conv_ref import BinaryConvAttrs, pack_weights
from tod_deploy.parity.comparator import verification_images
from tod_deploy.quant.pipeline import quantize_model

ORT_GOAL = 6.0  # 1-bit FCOS: OpenVINO over onnxruntime (issue 17)
REAL_GOAL = 3.0  # 1-bit FCOS on OpenVINO over the fastest real-valued FCOS (issue 17)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sibling(name: str) -> ModuleType:
    """Another script of this folder (benchmarks/ is no package), imported from its file."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODELS: dict[str, tuple[str, dict[str, Any]]] = sibling("int8_speed").MODELS  # the same exports as int8_speed.py
BINARY_CONV = sibling("binary_conv")  # block_model, plugin_conv, float_conv: binary_conv.py's one-node models


# --- shared -----------------------------------------------------------------------------------------------


def options(args: argparse.Namespace, precision: str = "fp32") -> RunnerOptions:
    """Runner options for timing runtimes in turn on the same cores (onnxruntime's threads do not spin)."""
    return RunnerOptions(threads=args.threads, precision=precision, spinning=False, log=log)


def runner(backend: str, path: Path, args: argparse.Namespace, precision: str = "fp32") -> Runner:
    return open_runner(backend, ExportSource(path, Sidecar.load(path)), options(args, precision))


def timed(calls: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Timing.stats() per call, all warmed up and then timed in interleaved rounds."""
    timings = time_interleaved(calls, batch=1, warmup=args.warmup, iters=args.iters, duration_s=None)
    return {name: timing.stats() for name, timing in timings.items()}


def export(name: str, out: Path, args: argparse.Namespace, variant: str | None = None) -> Path:
    """The ONNX file of MODELS[name] at --size (``variant``: e.g. DFR-Det's real-valued twin)."""
    method, overrides = MODELS[name]
    stem = f"{name}_{variant}" if variant else name
    checkpoint = args.checkpoints / f"{stem}.pth" if args.checkpoints else None
    checkpoint = checkpoint if checkpoint is not None and checkpoint.is_file() else None
    log(f"export {stem} at {args.size} ({checkpoint or 'seeded weights'}) ...")
    overrides = {**overrides, "input_size": args.size}
    result = export_model(method, out, checkpoint, variant, overrides, verify=False, name=stem, log=log)
    return result.onnx_path


def openvino_runners(path: Path, args: argparse.Namespace, label: str = "openvino") -> tuple[dict[str, Any], str]:
    """OpenVINO fp32, and auto when it runs another precision; the second value says what auto resolved to."""
    runners = {f"{label} fp32": runner("openvino", path, args, "fp32")}
    auto = runner("openvino", path, args, "auto")
    if auto.precision == runners[f"{label} fp32"].precision:
        return runners, f"auto runs {auto.precision} here, as the fp32 row: not timed twice"
    runners[f"{label} auto ({auto.precision})"] = auto
    return runners, f"auto runs {auto.precision}"


# --- part 1: the methods ----------------------------------------------------------------------------------


def synthetic_set(out: Path, size_hw: tuple[int, int], images: int, cache: dict[tuple[int, int], Path]) -> Path:
    """A synthetic tiny-object set at the model's input size (one per size), its folder."""
    if size_hw not in cache:
        root = out / f"synthetic-{size_hw[0]}x{size_hw[1]}"
        generate_synthetic(root, images=images, seed=7, size_hw=size_hw, overwrite=True)
        cache[size_hw] = root
    return cache[size_hw]


def fidelity(
    path: Path, int8: Path | None, precisions: list[str], data: Path, args: argparse.Namespace
) -> dict[str, float | None]:
    """AP50 against the onnxruntime FP32 row, per row name of the time table (None: no reference detections)."""
    scores: dict[str, float | None] = {}
    for precision in precisions:
        compare = [int8] if int8 is not None and precision == "fp32" else None  # the INT8 row once
        report = evaluate_model(
            path, data / ANNOTATIONS, data / IMAGES, backends="onnxruntime,openvino", class_agnostic=True,
            log=log, compare=compare, precision=precision,
        )  # fmt: skip
        try:
            score_fidelity(report, args.fidelity_score)
        except UserError as exc:  # the one it raises: the FP32 row has nothing that confident
            log(f"fidelity: {exc.line()}")
            return {}
        for row, metrics in report.fidelity.items():
            name = "onnxruntime int8" if row == "onnxruntime int8" else f"openvino {precision}"
            scores[name] = metrics["AP50"]
    return scores


def measure_model(name: str, args: argparse.Namespace, out: Path, sets: dict[tuple[int, int], Path]) -> dict:
    """One method: its export, INT8 file, the interleaved timings and the fidelity of each row."""
    path = export(name, out, args)
    int8 = None
    if not args.no_int8:
        log(f"quantize {name} (int8, onnxruntime layout) ...")
        target = path.with_name(f"{path.stem}.int8.onnx")
        int8 = quantize_model(path, "int8", target="onnxruntime", output=target, log=log, show_progress=False).output
    sidecar = Sidecar.load(path)
    images = verification_images(sidecar.recipe, 1, seed=1)
    runners: dict[str, Any] = {"onnxruntime fp32": runner("onnxruntime", path, args)}
    if int8 is not None:
        runners["onnxruntime int8"] = runner("onnxruntime", int8, args)
    ov_runners, auto_note = openvino_runners(path, args)
    runners |= ov_runners
    log(f"time {name}: {', '.join(runners)} ...")
    stats = timed({key: (lambda r=r: r.run(images)) for key, r in runners.items()}, args)
    size_hw = (int(sidecar.recipe.input_size[0]), int(sidecar.recipe.input_size[1]))
    precisions = ["fp32", *(["auto"] if len(ov_runners) > 1 else [])]
    scores = fidelity(path, int8, precisions, synthetic_set(out, size_hw, args.images, sets), args)
    base = stats["onnxruntime fp32"]["fps"]
    rows = []
    for key, st in stats.items():
        short = "openvino auto" if key.startswith("openvino auto") else key
        ap50 = "ref" if key == "onnxruntime fp32" else scores.get(short)
        rows.append({"runtime": key, **st, "x_ort_fp32": st["fps"] / base, "fidelity_ap50": ap50})
    describe = ov_runners["openvino fp32"].describe()
    return {
        "model": name,
        "input": list(size_hw),
        "files": {"fp32": str(path), **({"int8": str(int8)} if int8 else {})},
        "rows": rows,
        "openvino_auto": auto_note,
        "binary_layers": describe["binary_layers"],
        "fidelity_score": args.fidelity_score,
    }


def print_models(results: list[dict], args: argparse.Namespace, header: str) -> None:
    print(f"\n{header}")
    print(f"Methods, batch 1, {args.iters} interleaved rounds after {args.warmup} warm-ups; FPS from the median;")
    print("x ort = FPS / onnxruntime FP32's; AP50 = fidelity against onnxruntime FP32 (its detections scoring")
    score, images = args.fidelity_score, args.images
    print(f">= {score:g} as ground truth, {images} synthetic images at the input size, class-agnostic)")
    line = f"{'model':<9} {'input':>9}  {'runtime':<22} {'median ms':>10} {'FPS':>8} {'x ort':>7} {'AP50':>7}"
    print(line)
    print("-" * len(line))
    notes = []
    for result in results:
        if "error" in result:
            print(f"{result['model']:<9} failed: {result['error']}")
            continue
        h, w = result["input"]
        for i, row in enumerate(result["rows"]):
            ap = row["fidelity_ap50"]
            ap_text = ap if isinstance(ap, str) else ("n/a" if ap is None else f"{100 * ap:.1f}%")
            first = f"{result['model']:<9} {f'{h}x{w}':>9}" if i == 0 else " " * 19
            print(f"{first}  {row['runtime']:<22} {row['median_ms']:>10.1f} {row['fps']:>8.2f} "
                  f"{row['x_ort_fp32']:>6.2f}x {ap_text:>7}")  # fmt: skip
        layers = result["binary_layers"]
        if layers["native"] or layers["decomposed"]:
            decomposed = "; ".join(f"{n} decomposed: {why}" for why, n in layers["decomposed"].items())
            notes.append(f"{result['model']}: OpenVINO ran {layers['native']} tod::BinaryConv2d layers as native "
                         f"BinaryConvolution" + (f"; {decomposed}" if decomposed else ""))  # fmt: skip
        notes.append(f"{result['model']}: OpenVINO {result['openvino_auto']}")
    for note in dict.fromkeys(notes):
        print(f"  {note}")


# --- part 2: one 1-bit layer ------------------------------------------------------------------------------


def node_times_us(request: Any) -> tuple[float, float]:
    """Microseconds of the last inference in BinaryConvolution node(s), and in every other executed node."""
    kernel = rest = 0.0
    for info in request.profiling_info:
        us = info.real_time.total_seconds() * 1e6
        if info.node_type == "BinaryConvolution":
            kernel += us
        else:
            rest += us
    return kernel, rest


def bench_layer(channels: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """The five ways of one layer at one shape, interleaved; ms (medians) and the profile's split."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    weight = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
    attrs = BinaryConvAttrs(kernel_shape=(3, 3), in_channels=channels, pads=(1, 1, 1, 1), zero_sign=-1, pad_value=0)
    packed = pack_weights(weight, attrs.zero_sign)
    alpha = np.abs(weight).mean(axis=(1, 2, 3)).astype(np.float32)
    one_bit = BINARY_CONV.block_model(channels, size, *BINARY_CONV.plugin_conv(attrs, packed, alpha, False), ())
    dense = BINARY_CONV.block_model(channels, size, *BINARY_CONV.float_conv(weight), ())
    ort_plugin = open_runner("onnxruntime", ExportSource.in_memory(one_bit), options(args))  # via new_session
    ov_binary = open_runner("openvino", ExportSource.in_memory(one_bit), options(args))
    ov_float = open_runner("openvino", ExportSource.in_memory(dense), options(args))
    native = ov_binary.describe()["binary_layers"]["native"]
    if native != 1:
        log(f"warning: OpenVINO did not read the {channels}-channel layer as BinaryConvolution ({native} native)")
    request, profile = OpenVINORunner(one_bit, args.threads, "fp32", profile=True).request, []
    out = np.empty_like(x)

    def ov_kernel() -> None:
        request.infer({0: x})
        profile.append(node_times_us(request))

    calls = {
        "ort+ours": lambda: ort_plugin.run(x),
        "ours": lambda: binary_conv_cpu.binary_conv2d(x, packed, alpha, None, attrs, threads=args.threads, out=out),
        "ov e2e": lambda: ov_binary.run(x),
        "ov kernel": ov_kernel,
        "ov conv": lambda: ov_float.run(x),
    }
    ms = {name: st["median_ms"] for name, st in timed(calls, args).items()}
    timed_runs = np.asarray(profile[args.warmup :])  # the warm-up calls come first
    wall_ms = ms["ov kernel"]  # the profiled copy's whole inference, as the clock saw it
    ms["ov kernel"] = float(np.median(timed_runs[:, 0])) / 1000.0
    ms["ov rest"] = float(np.median(timed_runs[:, 1])) / 1000.0
    macs = channels * channels * 9 * size * size
    return {
        "shape": f"{channels}x{size}x{size}",
        "ms": ms,
        "ov_native_layers": native,
        "ov_profiled_wall_ms": wall_ms,
        "gmac_s": {k: macs / (ms[k] / 1000.0) / 1e9 for k in ("ours", "ov kernel")},
        "conv_over": {k: ms["ov conv"] / ms[k] for k in ("ort+ours", "ours", "ov e2e", "ov kernel")},
        "ov_kernel_over_ours": ms["ov kernel"] / ms["ours"],
    }


def print_layers(results: list[dict], header: str) -> None:
    print(f"\n{header}")
    print("One 1-bit layer (3x3, stride 1, pad 1, Cin = Cout, zero_sign -1, pad_value 0): median ms")
    cols = ("ort+ours", "ours", "ov e2e", "ov kernel", "ov rest", "ov conv")
    line = f"{'shape':>11} | " + " | ".join(f"{c:>9}" for c in cols)
    print(line)
    print("-" * len(line))
    for r in results:
        print(f"{r['shape']:>11} | " + " | ".join(f"{r['ms'][c]:>9.3f}" for c in cols))
    print("ort+ours: our kernel as a tod::BinaryConv2d node in onnxruntime; ours: the kernel alone;")
    print("ov e2e: the node in OpenVINO (FakeQuantize -> BinaryConvolution, reorders); ov kernel / ov rest:")
    print("its BinaryConvolution node / every other node, from the per-node profile; ov conv: OpenVINO's")
    print("float32 Convolution of the same shape.")
    print("\nRatios: OpenVINO float conv time / each 1-bit variant's; OV kernel / ours (> 1: ours faster);")
    print("binary GMAC/s = Cin*Cout*9*H*W / time")
    cols = ("ort+ours", "ours", "ov e2e", "ov kernel")
    line = f"{'shape':>11} | " + " | ".join(f"{'conv/' + c:>14}" for c in cols)
    line += f" | {'ov kern/ours':>12} | {'ours GMAC/s':>11} | {'OV GMAC/s':>9}"
    print(line)
    print("-" * len(line))
    for r in results:
        text = f"{r['shape']:>11} | " + " | ".join(f"{r['conv_over'][c]:>13.2f}x" for c in cols)
        rates = r["gmac_s"]
        text += f" | {r['ov_kernel_over_ours']:>11.2f}x | {rates['ours']:>11.0f} | {rates['ov kernel']:>9.0f}"
        print(text)


# --- part 3: 1-bit DFR-Det FCOS ---------------------------------------------------------------------------


def bench_dfr_det(one_bit: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The 1-bit FCOS on onnxruntime and OpenVINO, and its real-valued twin on every runtime, interleaved."""
    real = export("dfr_det", out, args, variant="real")
    images = verification_images(Sidecar.load(one_bit).recipe, 1, seed=1)
    one_bit_ov, one_bit_note = openvino_runners(one_bit, args, "1-bit openvino")
    real_ov, _ = openvino_runners(real, args, "real openvino")
    runners = {
        "1-bit onnxruntime": runner("onnxruntime", one_bit, args),
        **one_bit_ov,
        "real onnxruntime fp32": runner("onnxruntime", real, args),
        **real_ov,
    }
    log(f"time DFR-Det FCOS: {', '.join(runners)} ...")
    stats = timed({key: (lambda r=r: r.run(images)) for key, r in runners.items()}, args)
    best_ov = max(one_bit_ov, key=lambda k: stats[k]["fps"])
    fastest_real = max((k for k in stats if k.startswith("real")), key=lambda k: stats[k]["fps"])
    return {
        "files": {"1-bit": str(one_bit), "real": str(real)},
        "stats": stats,
        "openvino_auto": one_bit_note,
        "binary_layers": one_bit_ov["1-bit openvino fp32"].describe()["binary_layers"],
        "openvino_over_onnxruntime": stats["1-bit openvino fp32"]["fps"] / stats["1-bit onnxruntime"]["fps"],
        "openvino_1bit": best_ov,
        "fastest_real": fastest_real,
        "openvino_1bit_over_fastest_real": stats[best_ov]["fps"] / stats[fastest_real]["fps"],
    }


def print_dfr_det(result: dict[str, Any], args: argparse.Namespace, header: str) -> None:
    print(f"\n{header}")
    print(f"1-bit DFR-Det FCOS vs its real-valued twin at {args.size}, {args.iters} interleaved rounds")
    line = f"{'runtime':<28} {'median ms':>10} {'FPS':>8}"
    print(line)
    print("-" * len(line))
    for key, st in result["stats"].items():
        print(f"{key:<28} {st['median_ms']:>10.1f} {st['fps']:>8.2f}")
    print(f"  OpenVINO {result['openvino_auto']}; 1-bit layers on OpenVINO: {result['binary_layers']}")
    ratio = result["openvino_over_onnxruntime"]
    print(f"1-bit on OpenVINO fp32 / on onnxruntime: {ratio:.2f}x FPS (goal >= {ORT_GOAL:g}x)")
    ratio = result["openvino_1bit_over_fastest_real"]
    print(f"1-bit on OpenVINO ({result['openvino_1bit']}) / fastest real-valued ({result['fastest_real']}): "
          f"{ratio:.2f}x FPS (goal >= {REAL_GOAL:g}x)")  # fmt: skip


# --- main -------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--size", default="512x512", help="HxW input of every model")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-int8", action="store_true", help="skip the onnxruntime INT8 row")
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--layers-only", action="store_true", help="only part 2, the per-layer table")
    parts.add_argument("--no-layers", action="store_true", help="skip part 2, the per-layer table")
    parser.add_argument("--images", type=int, default=4, help="synthetic images for the fidelity")
    parser.add_argument("--fidelity-score", type=float, default=0.05)
    parser.add_argument("--checkpoints", type=Path, default=None, help="folder of <model>.pth (train_synthetic.py)")
    parser.add_argument("--out", type=Path, default=None, help="keep the exports here (default a temp folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    args.only = names
    if args.warmup < 0 or args.iters < 1:
        parser.error("--iters must be at least 1 and --warmup at least 0")
    return args


def main() -> None:
    args = parse_args()
    env = environment()
    versions = {"openvino": require_openvino().__version__, "onnxruntime": installed_version("onnxruntime")}
    header = (f"CPU: {env['cpu']}, {args.threads} threads; OpenVINO {versions['openvino']}, onnxruntime "
              f"{versions['onnxruntime']}; tod::BinaryConv2d ISA path {binary_conv_cpu.current_isa()}")  # fmt: skip
    log(header)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report: dict[str, Any] = {"environment": env, "versions": versions, "threads": args.threads, "args": settings}
    if not args.layers_only:
        out = args.out or Path(tempfile.mkdtemp(prefix="openvino-bench-"))
        out.mkdir(parents=True, exist_ok=True)
        sets: dict[tuple[int, int], Path] = {}
        models = []
        for name in args.only:
            try:
                models.append(measure_model(name, args, out, sets))
            except UserError as exc:
                log(f"{name} failed: {exc.line()}")
                models.append({"model": name, "error": exc.line()})
        report["models"] = models
        print_models(models, args, header)
    if not args.no_layers:
        layers = []
        for channels, size in RESNET18_STAGES:
            log(f"time one 1-bit layer, {channels}x{size}x{size} ...")
            layers.append(bench_layer(channels, size, args))
        report["layers"] = layers
        print_layers(layers, header)
    if not args.layers_only:
        done = next((m for m in report["models"] if m["model"] == "dfr_det" and "error" not in m), None)
        one_bit = Path(done["files"]["fp32"]) if done else export("dfr_det", out, args)
        report["dfr_det"] = bench_dfr_det(one_bit, args, out)
        print_dfr_det(report["dfr_det"], args, header)
        log(f"exports in {out}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
