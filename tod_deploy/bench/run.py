"""``bench``: one model file, every requested backend, timed side by side in one run."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tod_deploy.artifacts import Sidecar
from tod_deploy.backends import ExportSource, RunnerOptions, open_runner
from tod_deploy.backends.onnxruntime_runner import load_onnx
from tod_deploy.bench.timing import time_interleaved
from tod_deploy.environment import environment
from tod_deploy.errors import UserError
from tod_deploy.parity.comparator import verification_images


@dataclass
class BenchReport:
    model: str
    method: str
    input_size: tuple[int, int]
    batch: int
    threads: int
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)  # what a runtime says of its run (OpenVINO)

    def label(self, name: str) -> str:
        """A row's name: the backend, with the precision it ran when it says (``openvino (fp32)``)."""
        precision = self.runtimes.get(name, {}).get("precision")
        return f"{name} ({precision})" if precision else name

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
            "runtimes": self.runtimes,
            "environment": self.environment,
        }


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
    precision: str = "auto",
) -> BenchReport:
    engine: Path | None = None
    if path.suffix == ".engine" or "tensorrt" in backends:
        from tod_deploy.trt.runtime import require_tensorrt

        require_tensorrt()  # before any slow step, so its absence is the one line the user sees
    if path.suffix == ".engine":  # TensorRT first; other backends run the ONNX it was built from
        engine, plan = path, Sidecar.load(path)["plan"]
        if not plan.get("export"):
            raise UserError(f"{path.name} was built from an ONNX without export sidecar", "bench its ONNX instead")
        backends = ["tensorrt", *[b for b in backends if b != "tensorrt"]]
        source = ExportSource(Path(plan["onnx"]), Sidecar(plan["export"]), engine)
        onnx_batch = plan["inputs"][0]["shape"][0]
    else:
        model = load_onnx(path)  # first: a corrupt file is the error, not its missing sidecar
        source = ExportSource(path, Sidecar.load(path), _model=model)
        dims = source.onnx_model().graph.input[0].type.tensor_type.shape.dim
        onnx_batch = dims[0].dim_value or dims[0].dim_param
    sidecar, path = source.sidecar, source.onnx_path
    recipe = sidecar.recipe
    check_batch(onnx_batch, batch, path)
    threads = threads or os.cpu_count() or 1
    images = verification_images(recipe, batch, seed=0)
    # timed in turn on the same cores: onnxruntime's spinning threads would take them from the next runtime
    options = RunnerOptions(
        threads=threads, batch=batch, cuda_graph=cuda_graph, precision=precision, spinning=len(backends) == 1, log=log
    )
    opened = {backend: open_runner(backend, source, options) for backend in backends}
    runners: dict[str, Callable[[], object]] = {name: _bind(r.run, images) for name, r in opened.items()}
    log(f"timing {', '.join(runners)} (batch {batch}, {threads} threads, warm-up {warmup}) ...")
    timings = time_interleaved(runners, batch, warmup, iters, duration_s)
    source = str(engine or path)
    report = BenchReport(source, sidecar["method"], recipe.input_size, batch, threads, environment=environment())
    report.results = {name: timing.stats() for name, timing in timings.items()}
    report.runtimes = {name: r.describe() for name, r in opened.items() if hasattr(r, "describe")}
    if "tensorrt" in report.results:  # GPU-clock split of each call: copy in, engine, copy out
        report.results["tensorrt"].update(opened["tensorrt"].stage_means())
    return report


def _bind(run: Callable[[np.ndarray], object], images: np.ndarray) -> Callable[[], object]:
    return lambda: run(images)
