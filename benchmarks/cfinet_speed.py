"""CFINet speed on this machine, as ratios measured side by side in one run.

onnxruntime CPU vs PyTorch eager, the full detector at the public test size (1200x1200 images,
padded to 1216x1216 as mmdet does; top 1000 per level, 300 proposals), interleaved iterations
(issue target: >= 1.3x FPS). Also prints the per-part multiply-adds from ``inspect`` so the
cost of the coarse-to-fine RPN (a dilated and a deformable 3x3 conv per level) is visible.

Usage: python benchmarks/cfinet_speed.py [--iters 6] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from tod_deploy.bench.run import bench_model
from tod_deploy.export.pipeline import export_model
from tod_deploy.inspection import inspect_method


def log(line: str) -> None:
    print(line, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="cfinet-bench-"))
    threads = os.cpu_count() or 1

    exported = export_model("cfinet", out, log=log)
    bench = bench_model(exported.onnx_path, ["torch", "onnxruntime"], iters=args.iters, threads=threads, log=log)
    inspected = inspect_method("cfinet", None, {}, None, log=lambda _l: None)

    result = {
        "ort_vs_torch": bench.to_dict(),
        "ort_over_torch_fps": bench.ratios()["onnxruntime"],
        "gmacs": inspected["gmacs"],
        "parts": inspected.get("parts"),
    }
    for name, s in bench.results.items():
        print(f"CFINet 1216x1216 {name:12s} median {s['median_ms']:8.1f} ms  {s['fps']:6.3f} FPS")
    print(f"onnxruntime / torch FPS              {result['ort_over_torch_fps']:6.2f}x")
    print(f"multiply-adds                        {result['gmacs']:.1f} G")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
