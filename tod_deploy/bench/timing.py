"""Latency measurement that survives a noisy shared machine.

Backends are timed in interleaved rounds (A, B, A, B, ...) after their warm-ups, so a slow
spell of the machine hits every backend alike and the ratios between them stay meaningful.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Timing:
    backend: str
    batch: int
    latencies_ms: list[float] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        mean = float(lat.mean())
        return {
            "iters": int(lat.size),
            "mean_ms": mean,
            "median_ms": float(np.median(lat)),
            "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)),
            "min_ms": float(lat.min()),
            "max_ms": float(lat.max()),
            "fps": self.batch * 1000.0 / float(np.median(lat)),
        }


def time_interleaved(
    runners: dict[str, Callable[[], object]],
    batch: int,
    warmup: int,
    iters: int | None,
    duration_s: float | None,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, Timing]:
    """Warm every runner up, then run one call of each per round until iters or duration is reached.

    FPS is taken from the median latency: a single stall on a shared machine should not move it.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    timings = {name: Timing(name, batch) for name in runners}
    start = time.perf_counter()
    rounds = 0
    while True:
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            timings[name].latencies_ms.append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
        if on_round:
            on_round(rounds)
        if iters is not None and rounds >= iters:
            break
        if duration_s is not None and time.perf_counter() - start >= duration_s:
            break
    return timings
