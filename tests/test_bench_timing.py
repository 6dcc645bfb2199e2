from __future__ import annotations

import time

import pytest

from tod_deploy.backends import parse_backends
from tod_deploy.bench.run import check_batch
from tod_deploy.bench.timing import Timing, time_interleaved
from tod_deploy.errors import UserError


def test_interleaved_rounds_call_each_runner_alternately() -> None:
    calls: list[str] = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = time_interleaved(runners, batch=1, warmup=2, iters=3, duration_s=None)
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert all(len(t.latencies_ms) == 3 for t in timings.values())


def test_duration_bound_stops() -> None:
    start = time.perf_counter()
    timings = time_interleaved({"a": lambda: time.sleep(0.01)}, 1, 0, None, 0.1)
    assert 0.1 <= time.perf_counter() - start < 2.0
    assert 3 <= len(timings["a"].latencies_ms) <= 12


def test_stats_against_numpy_definitions() -> None:
    t = Timing("x", batch=4, latencies_ms=[10.0, 20.0, 30.0, 40.0, 1000.0])
    s = t.stats()
    assert s["mean_ms"] == 220.0 and s["median_ms"] == 30.0 and s["max_ms"] == 1000.0
    assert s["p90_ms"] == pytest.approx(616.0)  # linear interpolation between 40 and 1000
    assert s["fps"] == pytest.approx(4 * 1000 / 30.0)  # from the median: one stall does not move it


def test_backend_parsing_and_batch_check(tmp_path: object) -> None:
    assert parse_backends("onnxruntime, torch,onnxruntime", "torch") == ["onnxruntime", "torch"]
    with pytest.raises(UserError, match="unknown backend"):
        parse_backends("openvion", "torch")
    check_batch("batch", 8, tmp_path)  # dynamic axis takes any batch
    with pytest.raises(UserError, match="exported for batch 1"):
        check_batch(1, 2, tmp_path)
