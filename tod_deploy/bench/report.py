"""Terminal tables of a bench run and of a load run on a served model."""

from __future__ import annotations

from rich.table import Table

from tod_deploy.bench.run import BenchReport
from tod_deploy.bench.triton_load import LoadReport


def bench_table(report: BenchReport) -> Table:
    h, w = report.input_size
    env = report.environment
    title = f"{report.method} {h}x{w}, batch {report.batch}, {report.threads} threads - {env.get('cpu', '?')}"
    table = Table(title=title)
    first = next(iter(report.results))
    for column in ("backend", "iters", "mean ms", "median ms", "p90 ms", "p99 ms", "FPS", f"x vs {first}"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    ratios = report.ratios()
    for name, s in report.results.items():
        table.add_row(
            report.label(name), str(s["iters"]), f"{s['mean_ms']:.1f}", f"{s['median_ms']:.1f}", f"{s['p90_ms']:.1f}",
            f"{s['p99_ms']:.1f}", f"{s['fps']:.2f}", f"{ratios[name]:.2f}",
        )  # fmt: skip
    return table


def load_table(report: LoadReport) -> Table:
    """``bench --triton``: one row per concurrency, as perf_analyzer prints them."""
    title = (
        f"{report.model} served at {report.url} ({report.protocol}) - client on {report.environment.get('cpu', '?')}"
    )
    table = Table(title=title)
    columns = ("concurrency", "requests", "failed", "req/s", "p50 ms", "p90 ms", "p99 ms", "requests per execution")
    for column in columns:
        table.add_column(column, justify="right")
    for level in report.levels:
        table.add_row(
            str(level.concurrency), str(len(level.latencies_ms)), str(sum(level.failures.values())),
            f"{level.throughput:.2f}", f"{level.percentile(50):.1f}", f"{level.percentile(90):.1f}",
            f"{level.percentile(99):.1f}", f"{level.mean_batch():.2f}",
        )  # fmt: skip
    return table
