"""tod::BinaryConv2d CPU kernel vs onnxruntime's float32 Conv, ratios measured side by side in one run.

Shapes: the four ResNet-18 3x3 stage convolutions at 800x800 input (64ch@200x200, 128ch@100x100,
256ch@50x50, 512ch@25x25; stride 1, pad 1, Cout = Cin). Both sides get the same thread count
(default 2). Per shape, every runner is warmed up and then timed in interleaved rounds (ORT,
kernel/avx512, kernel/avx2, ...), so a noisy spell of a shared machine hits all of them alike;
the table reports medians. Issue 4 targets: >= 5x (aim 8x) on the AVX-512 path, >= 2.5x on AVX2.

Columns: ``kernel/<isa>`` is the compiled kernel called from Python (NumPy in, NumPy out);
``ort/plugin`` is the same kernel as a ``tod::BinaryConv2d`` node in onnxruntime through the
onnxruntime-extensions hook (best ISA), i.e. what an exported model pays per layer.

Usage: python benchmarks/binary_conv.py [--iters 15] [--threads 2] [--pad-value 0] [--zero-sign -1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tod_deploy.backends.onnxruntime_runner import new_session
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.ops.binary_conv_cases import RESNET18_STAGES
from tod_deploy.ops.binary_conv_ref import BinaryConvAttrs, pack_weights

SHAPES = RESNET18_STAGES
TARGETS = {"avx512": 5.0, "avx2": 2.5}


def float_conv_model(channels: int, size: int, weight: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def plugin_model(attrs: BinaryConvAttrs, size: int, packed: np.ndarray, alpha: np.ndarray) -> onnx.ModelProto:
    cout = packed.shape[0]
    inits = [
        numpy_helper.from_array(packed, "W_packed"),
        numpy_helper.from_array(alpha, "alpha"),
        numpy_helper.from_array(np.zeros(cout, np.float32), "bias"),
    ]
    node = helper.make_node("BinaryConv2d", ["x", "W_packed", "alpha", "bias"], ["y"], domain="tod", **attrs.to_onnx())
    graph = helper.make_graph(
        [node],
        "binary_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, attrs.in_channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tod", 1)])
    model.ir_version = 10
    return model


def bench_shape(channels: int, size: int, args: argparse.Namespace, isas: tuple[str, ...]) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    weight = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
    attrs = BinaryConvAttrs(
        kernel_shape=(3, 3),
        in_channels=channels,
        pads=(1, 1, 1, 1),
        zero_sign=args.zero_sign,
        pad_value=args.pad_value,
    )
    packed = pack_weights(weight, args.zero_sign)
    alpha = np.abs(weight).mean(axis=(1, 2, 3)).astype(np.float32)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    if not args.spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    dense = ort.InferenceSession(
        float_conv_model(channels, size, weight).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    plugin = new_session(plugin_model(attrs, size, packed, alpha), threads=args.threads)

    runners = {"ort/fp32": lambda: dense.run(None, {"x": x})}
    for isa in isas:
        runners[f"kernel/{isa}"] = lambda isa=isa: binary_conv_cpu.binary_conv2d(
            x, packed, alpha, None, attrs, isa=isa, threads=args.threads
        )
    runners["ort/plugin"] = lambda: plugin.run(None, {"x": x})
    timings = time_interleaved(runners, batch=1, warmup=args.warmup, iters=args.iters, duration_s=None)
    return {name: timing.stats()["median_ms"] for name, timing in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pad-value", type=int, default=0, choices=(-1, 0, 1))
    parser.add_argument("--zero-sign", type=int, default=-1, choices=(-1, 0, 1))
    parser.add_argument("--spin", action="store_true", help="let onnxruntime's idle threads spin (see docstring)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    isas = tuple(isa for isa in binary_conv_cpu.supported_isas() if isa != "scalar")
    print(
        f"ISA paths: {', '.join(binary_conv_cpu.supported_isas())}; threads {args.threads}; pad_value "
        f"{args.pad_value}; zero_sign {args.zero_sign}; {args.iters} interleaved rounds; load {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    results = {}
    for channels, size in SHAPES:
        results[f"{channels}x{size}x{size}"] = bench_shape(channels, size, args, isas)

    columns = ["ort/fp32", *(f"kernel/{isa}" for isa in isas), "ort/plugin"]
    header = (
        f"{'shape':>14} | "
        + " | ".join(f"{c:>12}" for c in columns)
        + " | "
        + " | ".join(f"{'x ' + isa:>9}" for isa in isas)
    )
    print(header + f" | {'x plugin':>9}")
    print("-" * len(header + " | x plugin"))
    shortfalls = []
    for shape, ms in results.items():
        ratios = {isa: ms["ort/fp32"] / ms[f"kernel/{isa}"] for isa in isas}
        line = f"{shape:>14} | " + " | ".join(f"{ms[c]:>9.2f} ms" for c in columns)
        line += " | " + " | ".join(f"{ratios[isa]:>8.1f}x" for isa in isas)
        print(line + f" | {ms['ort/fp32'] / ms['ort/plugin']:>8.1f}x")
        shortfalls += [f"{shape} {isa} {r:.1f}x < {TARGETS[isa]}x" for isa, r in ratios.items() if r < TARGETS[isa]]
    print("targets (>= 5x avx512, >= 2.5x avx2): " + ("met" if not shortfalls else "MISSED: " + "; ".join(shortfalls)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
