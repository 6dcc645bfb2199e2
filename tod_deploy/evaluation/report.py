"""The evaluation report: a terminal table (rows = backends), JSON (``EvalReport.to_dict``), a bar plot PNG.

The plot is drawn with Pillow (already required for reading images), not matplotlib: a grouped
bar chart needs a few rectangles and labels, not a plotting stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from tod_deploy.evaluation.coco_eval import TABLE_METRICS
from tod_deploy.evaluation.run import EvalReport

# Colour per backend/precision bar (colour-blind-safe Okabe-Ito palette).
PALETTE = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def eval_table(report: EvalReport) -> Table:
    h, w = report.input_size
    first = next(iter(report.results.values()), {})
    counts = first.get("counts", {})
    per_bin = counts.get("ground_truth_per_bin", {})
    caption = (
        f"objects per bin: vt {per_bin.get('vt', 0)}, t {per_bin.get('t', 0)}, s {per_bin.get('s', 0)}, "
        f"m {per_bin.get('m', 0)}; AP % at IoU .50:.95, {report.max_dets} dets/img"
    )
    title = (
        f"{report.method} {h}x{w} on {Path(report.data).name}: {report.num_images} images, "
        f"{counts.get('ground_truth', 0)} objects" + (", class-agnostic" if report.class_agnostic else "")
    )
    table = Table(title=title, caption=caption)
    table.add_column("backend")
    for metric in TABLE_METRICS:
        table.add_column(metric, justify="right")
    table.add_column("dets", justify="right")
    table.add_column("s/img", justify="right")
    for backend, metrics in report.results.items():
        per_image = report.seconds.get(backend, 0.0) / max(1, report.num_images)
        table.add_row(
            escape(backend), *(_fmt(metrics[m]) for m in TABLE_METRICS), str(metrics["counts"]["detections"]),
            f"{per_image:.3f}",
        )  # fmt: skip
    return table


def fidelity_table(report: EvalReport) -> Table | None:
    """Agreement of each row with the reference row (its detections taken as ground truth)."""
    if not report.fidelity:
        return None
    floor = report.noise_floor_row
    table = Table(
        title=f"deployment fidelity: agreement with {report.fidelity_reference} "
        f"(its detections with score >= {report.fidelity_min_score:g} as ground truth)",
        caption="AP % of each row scored against the reference's boxes; 100 = reproduces it. "
        "found: % of the reference's boxes the row detects at IoU >= 0.5, at any score "
        "(AP50 below found: boxes re-ranked, not lost). crossed up/down: per 100 reference boxes, the row's "
        "boxes at or above the cut on a reference box under it (ranked as false positives), and reference "
        "boxes the row scores under the cut only (ranked among its low scores)"
        + (f". {floor}: the reference on each image changed by at most one grey level per pixel, the fidelity "
           "so small a change costs (not gated)" if floor else ""),
    )  # fmt: skip
    table.add_column("row")
    for metric in TABLE_METRICS:
        table.add_column(metric, justify="right")
    table.add_column("found", justify="right")
    table.add_column("crossed up/down", justify="right")
    for row, metrics in report.fidelity.items():
        table.add_row(
            escape(row), *(_fmt(metrics[m]) for m in TABLE_METRICS), _fmt(metrics["AR50"]),
            f"{_fmt(metrics['crossed_up'])}/{_fmt(metrics['crossed_down'])}",
        )  # fmt: skip
    return table


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def write_plot(results: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """A grouped bar chart: one group per metric (AP ... APm), one bar per backend, values in %."""
    from PIL import Image, ImageDraw

    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    backends = list(results)
    width, height = 960, 540
    left, right, top, bottom = 70, 30, 60, 90
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    values = [[results[b].get(m) for b in backends] for m in TABLE_METRICS]
    peak = max([v for row in values for v in row if v is not None] + [0.0])
    ymax = max(0.1, min(1.0, (int(peak * 10) + 1) / 10))  # round the axis up to the next 10 %
    plot_h, plot_w = height - top - bottom, width - left - right

    def y_of(value: float) -> float:
        return top + plot_h * (1 - value / ymax)

    for k in range(6):  # grid lines and the y axis labels
        value = ymax * k / 5
        y = y_of(value)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{100 * value:.0f}", fill="black", font=small, anchor="rm")
    draw.text((18, top + plot_h / 2), "%", fill="black", font=font, anchor="mm")
    group_w = plot_w / len(TABLE_METRICS)
    bar_w = group_w * 0.8 / max(1, len(backends))
    for g, metric in enumerate(TABLE_METRICS):
        x0 = left + g * group_w + group_w * 0.1
        for b, value in enumerate(values[g]):
            bx = x0 + b * bar_w
            if value is None:
                draw.text((bx + bar_w / 2, y_of(0) - 4), "n/a", fill="gray", font=small, anchor="mb")
                continue
            color = PALETTE[b % len(PALETTE)]
            draw.rectangle([bx + 1, y_of(value), bx + bar_w - 1, y_of(0)], fill=color)
            draw.text((bx + bar_w / 2, y_of(value) - 2), f"{100 * value:.1f}", fill="black", font=small, anchor="mb")
        draw.text((left + (g + 0.5) * group_w, y_of(0) + 8), metric, fill="black", font=font, anchor="mt")
    draw.line([(left, top), (left, y_of(0)), (width - right, y_of(0))], fill="black")
    draw.text((width / 2, 20), title, fill="black", font=font, anchor="mt")
    lx = left
    for b, name in enumerate(backends):  # legend under the axis
        color = PALETTE[b % len(PALETTE)]
        draw.rectangle([lx, height - 40, lx + 16, height - 24], fill=color)
        draw.text((lx + 22, height - 32), name, fill="black", font=font, anchor="lm")
        lx += 40 + int(draw.textlength(name, font=font))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
