"""``bench``: one model file, every requested backend, timed side by side in one run."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tod_deploy.bench.timing import time_interleaved
from tod_deploy.environment import environment
from tod_deploy.errors import UserError
from tod_deploy.export.pipeline import read_sidecar, rebuild_deploy_model, recipe_of
from tod_deploy.parity.comparator import verification_images
from tod_deploy.runtimes import OnnxRuntimeRunner, TorchRunner, load_onnx

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass
class BenchReport:
    model: str
    method: str
    input_size: tuple[int, int]
    batch: int
    threads: int
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        """FPS of each backend relative to the first one requested."""
        names = list(self.results)
        base = self.results[names[0]]["fps"]
        return {name: self.results[name]["fps"] / base for name in names}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "input_size": list(self.input_size),
            "batch": self.batch,
            "threads": self.threads,
            "results": self.results,
            "fps_ratio_vs_" + next(iter(self.results)): self.ratios(),
            "environment": self.environment,
        }


def parse_backends(text: str) -> list[str]:
    names = [b.strip().lower() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if not names or unknown:
        raise UserError(f"unknown backend(s) {unknown or text!r}", f"choose from {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def check_batch(onnx_batch: object, batch: int, path: Path) -> None:
    if isinstance(onnx_batch, int) and onnx_batch > 0 and onnx_batch != batch:
        raise UserError(
            f"{path.name} was exported for batch {onnx_batch}, not {batch}",
            f"use --batch {onnx_batch}, or re-export with --batch dynamic",
        )


def bench_model(
    path: Path,
    backends: list[str],
    batch: int = 1,
    warmup: int = 3,
    iters: int | None = 20,
    duration_s: float | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    cuda_graph: bool = False,
) -> BenchReport:
    engine: Path | None = None
    if path.suffix == ".engine" or "tensorrt" in backends:
        from tod_deploy.trt.runtime import require_tensorrt

        require_tensorrt()  # before any slow step, so its absence is the one line the user sees
    if path.suffix == ".engine":  # TensorRT first; other backends run the ONNX it was built from
        from tod_deploy.trt.builder import read_engine_sidecar

        engine, plan = path, read_engine_sidecar(path)["plan"]
        if not plan.get("export"):
            raise UserError(f"{path.name} was built from an ONNX without export sidecar", "bench its ONNX instead")
        backends = ["tensorrt", *[b for b in backends if b != "tensorrt"]]
        path, sidecar, onnx_batch = Path(plan["onnx"]), plan["export"], plan["inputs"][0]["shape"][0]
        model = load_onnx(path) if "onnxruntime" in backends else None
    else:
        model = load_onnx(path)
        sidecar = read_sidecar(path)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        onnx_batch = dims[0].dim_value or dims[0].dim_param
    recipe = recipe_of(sidecar)
    check_batch(onnx_batch, batch, path)
    threads = threads or os.cpu_count() or 1
    images = verification_images(recipe, batch, seed=0)
    runners: dict[str, Callable[[], object]] = {}
    for backend in backends:
        if backend == "torch":
            deploy = rebuild_deploy_model(sidecar, log)
            runner = TorchRunner(deploy, ["num_dets", "boxes", "scores", "labels"], threads)
        elif backend == "onnxruntime":
            runner = OnnxRuntimeRunner(model, threads)
        else:  # tensorrt: the engine, or one built in memory from the ONNX (nothing written)
            from tod_deploy.trt.runner import runner_for

            runner = trt_runner = runner_for(engine, path, batch, log, cuda_graph)
        runners[backend] = _bind(runner.run, images)
    log(f"timing {', '.join(runners)} (batch {batch}, {threads} threads, warm-up {warmup}) ...")
    timings = time_interleaved(runners, batch, warmup, iters, duration_s)
    source = str(engine or path)
    report = BenchReport(source, sidecar["method"], recipe.input_size, batch, threads, environment=environment())
    report.results = {name: timing.stats() for name, timing in timings.items()}
    if "tensorrt" in report.results:  # GPU-clock split of each call: copy in, engine, copy out
        report.results["tensorrt"].update(trt_runner.stage_means())
    return report


def _bind(run: Callable[[np.ndarray], object], images: np.ndarray) -> Callable[[], object]:
    return lambda: run(images)
