"""Floors on an evaluation, for CI: ``eval --min-ap50 X --min-fidelity X`` exits 1 naming the rows below.

As Ultralytics' benchmark takes a metric floor, a user's CI can refuse an export, a quantized file or
a backend whose accuracy dropped. Two floors, both fractions (0..1, as in the JSON):

* ``min_ap50``: every row's AP50 against the data set's labels;
* ``min_fidelity``: every row's AP50 against the reference row's detections (``--fidelity``), i.e.
  how much of the FP32 onnxruntime result a quantized file or another backend reproduces.

A row with no value to compare (no labelled object, so AP50 is undefined) fails: a floor that cannot
be checked must not pass silently. The ``--noise-floor`` row is a yardstick, not something deployed:
no floor applies to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tod_deploy.errors import UserError
from tod_deploy.evaluation.run import EvalReport

GATED_METRIC = "AP50"


@dataclass(frozen=True)
class GateFailure:
    row: str
    floor_name: str  # "ap50" (against the labels) or "fidelity" (against the reference row)
    value: float | None
    floor: float

    def line(self) -> str:
        what = "AP50" if self.floor_name == "ap50" else "fidelity AP50"
        shown = "undefined (no ground truth)" if self.value is None else f"{100 * self.value:.1f}%"
        return f"{self.row}: {what} {shown} is below the floor {100 * self.floor:.1f}%"

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "floor": self.floor_name, "value": self.value, "min": self.floor}


def check_floors(report: EvalReport, min_ap50: float | None, min_fidelity: float | None) -> list[GateFailure]:
    """Every row under a floor, in table order (labels first, then fidelity)."""
    failures: list[GateFailure] = []
    if min_ap50 is not None:
        for row, metrics in _gated(report, report.results).items():
            value = metrics.get(GATED_METRIC)
            if value is None or value < min_ap50:
                failures.append(GateFailure(row, "ap50", value, min_ap50))
    if min_fidelity is not None:
        gated = _gated(report, report.fidelity)
        if not gated:
            raise UserError(
                "--min-fidelity needs a row to compare with the reference",
                "add --compare model.int8.onnx or a second --backend",
            )
        for row, metrics in gated.items():
            value = metrics.get(GATED_METRIC)
            if value is None or value < min_fidelity:
                failures.append(GateFailure(row, "fidelity", value, min_fidelity))
    return failures


def _gated(report: EvalReport, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``rows`` less the ``--noise-floor`` yardstick, which no floor applies to."""
    return {row: metrics for row, metrics in rows.items() if row != report.noise_floor_row}
