"""Terminal tables (rich) and JSON of a quantize run."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from tod_deploy.quant.activation_sqnr import MARGIN_DB, exclude_pattern, low_sqnr


def comparison_table(result: Any) -> Table:
    """FP32 vs quantized, per compared tensor, threshold and for the detections (a report: nothing fails here)."""
    c = result.comparison
    precision = result.sidecar["quantization"]["precision"]
    table = Table(title=f"{precision} vs fp32 in onnxruntime on {c.inputs} seeded inputs (report, not a gate)")
    for column in ("tensor", "max abs err", "rel RMS err", "within atol/rtol", "atol / rtol"):
        table.add_column(column, justify="left" if column == "tensor" else "right")
    for o in [*c.outputs, *(d.input for d in c.decisions)]:
        inside = 100.0 * (o.total - o.failing) / max(o.total, 1)
        table.add_row(o.name, f"{o.max_abs:.3g}", f"{o.rel_rms:.3g}", f"{inside:.1f}%", f"{o.atol:g} / {o.rtol:g}")
    for d in c.decisions:
        table.add_row(d.name, f"{d.flips} of {d.decisions} flipped", "-", f"{d.excused} excused", "-")
    d = c.detections
    if d is not None:
        frac = d.matched_fraction()
        table.add_row(
            "detections",
            f"matched {d.matched}/{d.checked}",
            f"min IoU {d.min_iou:.3f}",
            "-" if frac is None else f"{100 * frac:.1f}%",
            f"IoU>={d.min_iou_required:g} / score {d.score_tol:g}",
        )
    return table


def summary_line(result: Any) -> str:
    q = result.sidecar["quantization"]
    kept = ", ".join(f"{reason} {len(nodes)}" for reason, nodes in q["kept_fp32"].items() if nodes)
    size = result.sidecar["onnx"]["bytes"] / 1e6
    return f"wrote {result.output} ({size:.1f} MB) and {result.sidecar_path.name}; kept in FP32: {kept or 'none'}"


def sensitivity_table(report: Any, top: int = 15) -> Table:
    title = (
        f"INT8 per-layer sensitivity: each layer quantized alone, {report.measured} of {report.layers} layers, "
        f"{report.inputs} calibration images (relative RMS error vs FP32; worst first)"
    )
    table = Table(title=title)
    for column in ("#", "node", "op", "default", "layer output err", "model output err", "worst tensor"):
        table.add_column(column, justify="right" if "err" in column or column == "#" else "left")
    for i, row in enumerate(report.rows[:top], 1):
        table.add_row(
            str(i), row.node, row.op_type, f"fp32 ({row.role})" if row.role else "int8",
            f"{row.layer_error:.3g}", f"{row.output_error:.3g}", row.worst_output,
        )  # fmt: skip
    return table


def suggestion_line(report: Any) -> str:
    picks = report.suggested_excludes()
    if not picks:
        return "no layer stands out (none above 2x the median output error): no --exclude suggested"
    return "suggested: " + " ".join(f"--exclude '{p}'" for p in picks)


def sqnr_table(report: Any, top: int = 10) -> Table:
    """The written file's activations whose 8-bit round trip keeps the least signal (quant.activation_sqnr)."""
    low = {r.tensor for r in low_sqnr(report.tensors)}
    title = (
        f"INT8 activations: signal kept by each tensor's own Q/DQ in the FP32 model, {len(report.tensors)} tensors, "
        f"{report.inputs} calibration images (lowest first; * = {MARGIN_DB:g} dB below the median)"
    )
    table = Table(title=title)
    for column in ("#", "tensor", "SQNR dB", "saturated", "nodes that keep it float"):
        table.add_column(column, justify="left" if column in ("tensor", "nodes that keep it float") else "right")
    for i, row in enumerate(report.tensors[:top], 1):
        mark = "*" if row.tensor in low else ""
        table.add_row(str(i), f"{row.tensor}{mark}", f"{row.sqnr_db:.1f}", f"{100 * row.saturated:.2f}%",
                      ", ".join(row.nodes))  # fmt: skip
    return table


def sqnr_suggestion_line(report: Any) -> str:
    """One ``--exclude`` for the marked tensors, or why there is none."""
    low = low_sqnr(report.tensors)
    pattern = exclude_pattern(low)
    if pattern is None:
        return f"no activation is {MARGIN_DB:g} dB below the median SQNR: no tensor to keep float"
    return f"to keep the {len(low)} marked tensors float (slower: their readers run float too): --exclude '{pattern}'"


def to_json(result: Any) -> dict[str, Any]:
    data = {"output": str(result.output), "sidecar": result.sidecar.to_dict()}
    if result.sensitivity is not None:
        data["sensitivity"] = result.sensitivity.to_dict()
    return data
