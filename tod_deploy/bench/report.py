"""Terminal table of a bench run."""

from __future__ import annotations

from rich.table import Table

from tod_deploy.bench.run import BenchReport


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
            name, str(s["iters"]), f"{s['mean_ms']:.1f}", f"{s['median_ms']:.1f}", f"{s['p90_ms']:.1f}",
            f"{s['p99_ms']:.1f}", f"{s['fps']:.2f}", f"{ratios[name]:.2f}",
        )  # fmt: skip
    return table
