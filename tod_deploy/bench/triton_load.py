"""Load on a served model (``bench --triton``): throughput and latency percentiles per concurrency.

What perf_analyzer reports, from Python: for each concurrency C, C clients (one connection each,
HTTP or gRPC) send requests back to back for a bounded count or time; every answer's latency is
kept, failures are counted with their message (never hidden in the throughput), and the server's
own statistics give how many requests each model execution served (the dynamic batcher's work).
The request is built from the model's metadata: seeded pixels for a float input, an encoded PNG
for an ensemble that takes image bytes.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tod_deploy.errors import UserError, first_line

PROTOCOLS = ("http", "grpc")
Check = Callable[[dict[str, np.ndarray]], None]  # raises AssertionError on a wrong answer


@dataclass
class LoadLevel:
    concurrency: int
    seconds: float
    latencies_ms: list[float]
    failures: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    # the server's statistics over the level, per model that ran (an ensemble's steps each):
    # (requests it ran, in this many executions)
    batching: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def mean_batch(self) -> float:
        """Requests per execution of the least batched model (an ensemble is as batched as its
        least batched step); NaN when the server could not say."""
        ratios = [inferences / executions for inferences, executions in self.batching.values() if executions]
        return min(ratios) if ratios else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": len(self.latencies_ms),
            "failed": sum(self.failures.values()),
            "failures": dict(self.failures),
            "wrong": self.wrong,
            "seconds": round(self.seconds, 4),
            "throughput_per_s": round(self.throughput, 3),
            "latency_ms": {f"p{q}": round(self.percentile(q), 3) for q in (50, 90, 99)},
            "server": {
                name: {"inferences": i, "executions": e, "mean_batch": i / e if e else None}
                for name, (i, e) in self.batching.items()
            },
        }


@dataclass
class LoadReport:
    url: str
    model: str
    protocol: str
    levels: list[LoadLevel]
    environment: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "protocol": self.protocol,
            "levels": [level.to_dict() for level in self.levels],
            "environment": self.environment,
        }


class Client:
    """One connection to the server (tritonclient's clients are not shared between threads)."""

    def __init__(self, url: str, protocol: str) -> None:
        if protocol not in PROTOCOLS:
            raise UserError(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}", "use --protocol http")
        self.protocol = protocol
        try:
            if protocol == "http":
                import tritonclient.http as module
            else:
                import tritonclient.grpc as module
        except ImportError as exc:
            raise UserError("tritonclient is not installed", "pip install 'tod-deploy[serve]'") from exc
        self.module = module
        self.client = module.InferenceServerClient(url=url.removeprefix("http://").removeprefix("grpc://"))

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        requested = []
        for name, value in inputs.items():
            tensor = self.module.InferInput(name, list(value.shape), triton_datatype(value))
            tensor.set_data_from_numpy(value)
            requested.append(tensor)
        result = self.client.infer(model, requested, outputs=[self.module.InferRequestedOutput(n) for n in outputs])
        return {name: result.as_numpy(name) for name in outputs}

    def metadata(self, model: str) -> dict[str, Any]:
        return self._as_dict(self.client.get_model_metadata(model))

    def executed_models(self, model: str) -> list[str]:
        """The models a request to ``model`` runs: an ensemble's steps, else the model itself."""
        config = self._as_dict(self.client.get_model_config(model))
        config = config.get("config", config)  # gRPC wraps it in a response
        steps = config.get("ensemble_scheduling", {}).get("step", [])
        return [step["model_name"] for step in steps] or [model]

    def _as_dict(self, data: Any) -> dict[str, Any]:
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            return MessageToDict(data, preserving_proto_field_name=True)
        return data

    def statistics(self, model: str) -> tuple[int, int] | None:
        """(inferences, executions) the server counted for ``model`` so far; None while it cannot say
        (a server restarted under load starts counting afresh)."""
        try:
            data = self.client.get_inference_statistics(model)
        except Exception:  # unreachable or restarting: no counts, the requests' own failures tell
            return None
        stats = self._as_dict(data)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    def close(self) -> None:
        self.client.close()


def triton_datatype(value: np.ndarray) -> str:
    if value.dtype == object:
        return "BYTES"
    table = {"float32": "FP32", "float16": "FP16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8"}
    return table[value.dtype.name]


def example_request(metadata: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """One request (batch 1) for a served model: seeded pixels 0..255, or a PNG for image bytes."""
    rng = np.random.default_rng(seed)
    request = {}
    for tensor in metadata["inputs"]:
        shape = [int(d) for d in tensor["shape"]]
        shape = [1, *shape[1:]] if shape and shape[0] == -1 else shape
        if tensor["datatype"] == "BYTES":
            request[tensor["name"]] = np.array(
                [[encode_png(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))]], object
            )
        elif any(d < 0 for d in shape):
            raise UserError(f"input {tensor['name']} has a free dimension {shape}", "benchmark a model of fixed size")
        else:
            request[tensor["name"]] = rng.uniform(0, 255, shape).astype(np.float32)
    return request


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def run_load(
    url: str,
    model: str,
    concurrencies: list[int],
    *,
    protocol: str = "http",
    requests_per_client: int | None = None,
    duration_s: float | None = None,
    request: dict[str, np.ndarray] | None = None,
    check: Check | None = None,
    log: Callable[[str], None] = print,
) -> LoadReport:
    """Each concurrency in turn: its clients send ``request`` until the count or the time is spent."""
    from tod_deploy.environment import environment

    if (requests_per_client is None) == (duration_s is None):
        raise UserError("give one of a request count or a duration", "e.g. --requests 200 or --duration 10")
    probe = Client(url, protocol)
    try:
        try:
            metadata = probe.metadata(model)
        except Exception as exc:  # the server's own error: unknown model, not ready, unreachable
            raise UserError(
                f"cannot reach model {model!r} at {url} ({first_line(exc)})", "check the URL and --model"
            ) from exc
        request = request if request is not None else example_request(metadata)
        outputs = [o["name"] for o in metadata["outputs"]]
        executed = probe.executed_models(model)
        levels = []
        for concurrency in concurrencies:
            before = {name: probe.statistics(name) for name in executed}
            level = _one_level(
                url, protocol, model, concurrency, request, outputs, requests_per_client, duration_s, check
            )
            answered = len(level.latencies_ms)
            for name, counts in before.items():
                if counts is not None:
                    level.batching[name] = _settled_statistics(probe, name, counts, answered)
            log(f"concurrency {concurrency}: {level.throughput:.2f} req/s, p50 {level.percentile(50):.1f} ms")
            levels.append(level)
    finally:
        probe.close()
    return LoadReport(url, model, protocol, levels, environment())


def _settled_statistics(client: Client, model: str, before: tuple[int, int], answered: int) -> tuple[int, int]:
    """The server's counts since ``before``: it updates them just after answering, so wait (briefly)
    until every answered request is counted."""
    deadline = time.monotonic() + 2.0
    while True:
        after = client.statistics(model)
        if after is None or after[0] < before[0]:  # unreachable, or restarted: its counts began again
            return 0, 0
        counts = after[0] - before[0], after[1] - before[1]
        if counts[0] >= answered or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


def _one_level(
    url: str,
    protocol: str,
    model: str,
    concurrency: int,
    request: dict[str, np.ndarray],
    outputs: list[str],
    count: int | None,
    duration_s: float | None,
    check: Check | None,
) -> LoadLevel:
    lock = threading.Lock()
    level = LoadLevel(concurrency, 0.0, [])
    start = time.perf_counter()
    deadline = start + duration_s if duration_s is not None else None

    def client_loop() -> None:
        client = Client(url, protocol)
        sent = 0
        try:
            while (count is None or sent < count) and (deadline is None or time.perf_counter() < deadline):
                sent += 1
                t0 = time.perf_counter()
                try:
                    answer = client.infer(model, request, outputs)
                except Exception as exc:  # the server's answer to this request: counted, not raised
                    with lock:
                        level.failures[first_line(exc)] += 1
                    continue
                elapsed = (time.perf_counter() - t0) * 1e3
                wrong = False
                if check is not None:
                    try:
                        check(answer)
                    except AssertionError:
                        wrong = True
                with lock:
                    level.latencies_ms.append(elapsed)
                    level.wrong += wrong
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - start
    return level
