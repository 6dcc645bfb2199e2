"""What a comparison found: one row per tensor, per decision and for the detections.

Rows accumulate over the seeded inputs (worst error, failing counts, sums of squares), so a
report reads the same whether one input or ten were compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class OutputParity:
    name: str
    atol: float
    rtol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    failing: int = 0
    total: int = 0
    sum_sq_err: float = 0.0
    sum_sq_ref: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failing == 0

    @property
    def rel_rms(self) -> float:
        """||got - ref|| / ||ref|| over every compared input (the size of an error that is spread out)."""
        return float(np.sqrt(self.sum_sq_err / max(self.sum_sq_ref, 1e-24)))

    def add(self, ref: np.ndarray, got: np.ndarray, passing: np.ndarray | None) -> None:
        """Fold one input's comparison in; ``passing`` is None when the shapes differ (all elements fail)."""
        self.total += ref.size
        if passing is None:
            self.failing += ref.size
            self.max_abs = self.max_rel = float("inf")
            return
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        err = np.abs(ref64 - got64)
        self.failing += int(np.count_nonzero(~passing))
        self.max_abs = max(self.max_abs, float(err.max(initial=0.0)))
        self.max_rel = max(self.max_rel, float((err / np.maximum(np.abs(ref64), 1e-12)).max(initial=0.0)))
        finite = np.isfinite(err)
        self.sum_sq_err += float(np.sum(err[finite] ** 2))
        self.sum_sq_ref += float(np.sum(ref64[finite] ** 2))

    def failure(self) -> str:
        return (
            f"output {self.name}: {self.failing} of {self.total} elements exceed atol {self.atol:g} and rtol "
            f"{self.rtol:g} (max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g})"
        )


@dataclass
class DecisionParity:
    """A hard decision (a threshold's sign, 1-bit layers' input signs) and how the two runtimes took it.

    ``input`` compares what the decision is taken on; a flip (the runtimes decided differently) is
    excused only where that input agrees within tolerance, i.e. lies within tolerance of the boundary.
    ``output`` compares what follows the decision with the reference teacher-forced (fed the
    backend's input), so an excused flip cannot fail every later tensor; None when not forced.
    """

    name: str
    kind: str  # "threshold" | "1-bit input"
    sites: int
    input: OutputParity
    output: OutputParity | None = None
    decisions: int = 0
    flips: int = 0
    excused: int = 0

    @property
    def ok(self) -> bool:
        return self.input.ok and self.flips == self.excused and (self.output is None or self.output.ok)

    def flips_line(self) -> str:
        if not self.flips:
            return "no flips"
        plural = "s" if self.flips != 1 else ""
        if self.flips == self.excused:
            return f"{self.flips} flip{plural} at the threshold, excused"
        return f"{self.flips - self.excused} flips away from the threshold, {self.excused} excused"

    def failure(self) -> str:
        if self.flips != self.excused:
            return (
                f"{self.name}: {self.flips - self.excused} of {self.decisions} decisions flipped away from the "
                f"threshold (input differs beyond atol {self.input.atol:g} / rtol {self.input.rtol:g})"
            )
        if not self.input.ok:
            return f"{self.name} input: " + self.input.failure().removeprefix("output ")
        assert self.output is not None
        return self.output.failure() + " (teacher-forced)"


@dataclass
class DetectionAgreement:
    """Detections (or a selection's boxes, e.g. proposals) of two runtimes matched one by one."""

    min_iou_required: float
    score_tol: float
    max_excused_share: float
    name: str = "detections"
    reference: int = 0
    checked: int = 0
    matched: int = 0
    count_diff: int = 0
    min_iou: float = 1.0
    max_score_diff: float = 0.0
    near_ties: int = 0  # unmatched because NMS met two overlapping boxes with (nearly) equal scores
    cascaded: int = 0  # unmatched because a near-tie above it changed which box suppressed it
    # checked reference boxes scoring exactly as another does (dead features give whole plateaus): which of
    # them a runtime keeps is its own choice, so near-ties among them are not evidence of an error
    tied: int = 0

    @property
    def ok(self) -> bool:
        allowed = max(1, int(self.checked * self.max_excused_share)) + self.tied
        return (
            self.near_ties <= allowed
            and self.matched + self.near_ties + self.cascaded == self.checked
            and self.count_diff <= max(1, int(self.reference * self.max_excused_share))
        )

    def matched_fraction(self) -> float | None:
        return None if self.checked == 0 else self.matched / self.checked

    def failure(self) -> str:
        return (
            f"{self.name}: {self.matched} of {self.checked} matched (IoU >= {self.min_iou_required}, score within "
            f"{self.score_tol:g}), {self.near_ties} NMS near-ties ({self.tied} boxes tie exactly in the reference), "
            f"{self.cascaded} boxes the near-ties changed; unexplained: min IoU {self.min_iou:.4f}, "
            f"max score diff {self.max_score_diff:.3g}, count differs by {self.count_diff}"
        )


@dataclass
class ParityReport:
    backend: str
    reference: str
    inputs: int
    gate: bool = True  # False: a report of how far the candidate moved, not a pass/fail check
    outputs: list[OutputParity] = field(default_factory=list)
    decisions: list[DecisionParity] = field(default_factory=list)
    selections: list[DetectionAgreement] = field(default_factory=list)  # e.g. proposals, then forced
    detections: DetectionAgreement | None = None

    @property
    def ok(self) -> bool:
        return (
            all(o.ok for o in self.outputs)
            and all(d.ok for d in self.decisions)
            and all(s.ok for s in self.selections)
            and (self.detections is None or self.detections.ok)
        )

    def decision(self, name: str) -> DecisionParity:
        return next(d for d in self.decisions if d.name == name)

    @property
    def teacher_forced_layers(self) -> int:
        return sum(d.sites for d in self.decisions if d.output is not None)

    @property
    def excused_flips(self) -> int:
        return sum(d.excused for d in self.decisions)

    def failure(self) -> str:
        """The first reason the check failed, as one line ('' when it passed)."""
        rows = [*self.outputs, *self.decisions, *self.selections]
        for row in [*rows, *([self.detections] if self.detections is not None else [])]:
            if not row.ok:
                return row.failure()
        return ""

    def to_dict(self) -> dict[str, Any]:
        def row(parity: OutputParity) -> dict[str, Any]:
            out = {k: v for k, v in asdict(parity).items() if not k.startswith("sum_sq")}
            return out | {"rel_rms": parity.rel_rms, "ok": parity.ok}

        decisions = [
            {
                "name": d.name, "kind": d.kind, "sites": d.sites, "decisions": d.decisions, "flips": d.flips,
                "excused": d.excused, "input": row(d.input), "output": row(d.output) if d.output else None,
                "ok": d.ok,
            }
            for d in self.decisions
        ]  # fmt: skip
        def matching(agreement: DetectionAgreement) -> dict[str, Any]:
            return asdict(agreement) | {"ok": agreement.ok, "matched_fraction": agreement.matched_fraction()}

        return {
            "backend": self.backend,
            "reference": self.reference,
            "inputs": self.inputs,
            "gate": self.gate,
            "ok": self.ok,
            "outputs": [row(o) for o in self.outputs],
            "decisions": decisions,
            "excused_flips": self.excused_flips,
            "teacher_forced_layers": self.teacher_forced_layers,
            "selections": [matching(s) for s in self.selections],
            "detections": matching(self.detections) if self.detections is not None else None,
        }
