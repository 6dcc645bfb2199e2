"""Served on Triton vs in process: DFR-Det (1-bit, tod::BinaryConv2d) and ThumbDet, one run.

Issue 14: throughput of the model served by a real Triton Inference Server (the serve extra's
tritonserver, Triton's Python backend running tod-deploy's onnxruntime session, dynamic batching)
against the same ONNX in onnxruntime in this process, at concurrency 1 and 8. In process, C
threads share one session (onnxruntime sessions are thread-safe); served, C clients (HTTP, one
connection each) send requests back to back. Client and server share this machine's cores, so the
served figures include the client's own cost, as a perf_analyzer run on the same host would.

Usage: python benchmarks/triton_serving.py [--size 512x512] [--seconds 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tod_deploy.backends.onnxruntime_runner import new_session
from tod_deploy.bench.triton_load import run_load
from tod_deploy.environment import cpu_model
from tod_deploy.export.pipeline import export_model
from tod_deploy.parity.comparator import verification_images
from tod_deploy.targets.triton import TritonOptions, plan_repository, write_repository
from tod_deploy.targets.triton_server import Ports, TritonServer

CONCURRENCY = (1, 8)


def log(line: str) -> None:
    print(line, file=sys.stderr)


def in_process(onnx_path: Path, images: np.ndarray, concurrency: int, seconds: float) -> float:
    """Requests per second of ``concurrency`` threads calling one onnxruntime session back to back."""
    session = new_session(onnx_path, os.cpu_count())
    name = session.get_inputs()[0].name
    session.run(None, {name: images})  # warm-up
    done = [0] * concurrency
    deadline = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < deadline:
            session.run(None, {name: images})
            done[i] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="triton-bench-"))
    repo = out / "repo"
    exports = {
        "dfr_det_fcos": export_model(
            "dfr_det", out, overrides={"input_size": args.size, "binary_conv": "plugin", "batch": "dynamic"}, log=log
        ),  # fmt: skip
        "thumbdet": export_model("thumbdet", out, overrides={"input_size": args.size, "batch": "dynamic"}, log=log),
    }
    for export in exports.values():
        options = TritonOptions(backend="python", max_batch=8, queue_delay_us=2000)
        write_repository(plan_repository(export.onnx_path, options), repo, overwrite=True)
    rows = []
    with TritonServer(repo, Ports.free()) as server:
        address = f"127.0.0.1:{server.ports.http}"
        for name, export in exports.items():
            images = verification_images(export.sidecar.recipe, 1, seed=0)
            for concurrency in CONCURRENCY:
                local = in_process(export.onnx_path, images, concurrency, args.seconds)
                report = run_load(address, name, [concurrency], duration_s=args.seconds,
                                  request={"images": images}, log=log)  # fmt: skip
                level = report.levels[0]
                rows.append({
                    "model": name, "concurrency": concurrency, "in_process_per_s": round(local, 3),
                    "served_per_s": round(level.throughput, 3),
                    "served_over_in_process": round(level.throughput / local, 3),
                    "served_p50_ms": round(level.percentile(50), 1), "served_p99_ms": round(level.percentile(99), 1),
                    "failed": sum(level.failures.values()), "requests_per_execution": round(level.mean_batch(), 2),
                })  # fmt: skip
    cpu = f"{cpu_model()}, {os.cpu_count()} cores"
    print(f"Triton (python backend, dynamic batching) vs in-process onnxruntime, {args.size}, one run - {cpu}")
    print(f"{'model':14} {'conc':>4} {'in-process/s':>12} {'served/s':>9} {'ratio':>6} ", end="")
    print(f"{'p50 ms':>8} {'p99 ms':>8} {'batch':>6}")
    for r in rows:
        print(
            f"{r['model']:14} {r['concurrency']:>4} {r['in_process_per_s']:>12.2f} {r['served_per_s']:>9.2f} "
            f"{r['served_over_in_process']:>6.2f} {r['served_p50_ms']:>8.1f} {r['served_p99_ms']:>8.1f} "
            f"{r['requests_per_execution']:>6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "size": args.size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
