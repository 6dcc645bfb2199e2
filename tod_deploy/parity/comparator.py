"""One comparator: two runners, the same seeded inputs, one policy, one report.

``reference`` and ``candidate`` are runners (``run(images) -> {name: array}``). A reference that
can be teacher-forced (forcing.TeacherForcedRunner, PyTorch) is run after the candidate with the
candidate's inputs at every decision; any other reference (onnxruntime for an engine or a
quantized file) runs on its own, and only the decisions both files expose (Sign nodes) are judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tod_deploy.backends.base import Runner
from tod_deploy.parity.decisions import DecisionRecord, DecisionSite, SelectionRecord, judge
from tod_deploy.parity.detections import DetectionRule, agree_detections, new_agreement
from tod_deploy.parity.policy import ParityPolicy
from tod_deploy.parity.report import DecisionParity, DetectionAgreement, OutputParity, ParityReport
from tod_deploy.recipes import Recipe


@dataclass(frozen=True)
class ParityPlan:
    """What to compare: dense tensors element-wise, decision sites, detections (None: no contract)."""

    dense: tuple[str, ...]
    input_size: tuple[int, int]
    pixel: frozenset[str] = frozenset()  # dense tensors in input pixels (policy.tolerance)
    sites: tuple[DecisionSite, ...] = ()
    detections: DetectionRule | None = None


def verification_images(recipe: Recipe, batch: int, seed: int) -> np.ndarray:
    """Seeded inputs of two kinds: pixel noise, and smooth blobs that look more like images."""
    gen = torch.Generator().manual_seed(seed)
    h, w = recipe.input_size
    if seed % 2 == 0:
        x = torch.rand(batch, 3, h, w, generator=gen) * 255
    else:
        coarse = torch.rand(batch, 3, max(h // 32, 2), max(w // 32, 2), generator=gen)
        x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
        x = x.clamp(0, 1) * 255
    return x.numpy().astype(np.float32)


def compare_into(
    row: OutputParity, ref: np.ndarray, got: np.ndarray, policy: ParityPolicy, scaled: bool = True
) -> None:
    """Fold one input's ``got`` against ``ref`` into ``row`` (a shape mismatch fails every element).

    ``scaled``: a dense tensor, whose atol grows to ``policy.dense_atol`` (the row shows the largest
    applied); tensors in pixels keep theirs (``policy.tolerance``).
    """
    if ref.shape != got.shape:
        row.add(ref, got, None)
        return
    if scaled:
        row.atol = policy.dense_atol(row.atol, ref)
    got = got.astype(ref.dtype, copy=False)
    row.add(ref, got, policy.within(ref, got, row.atol, row.rtol))


def compare(
    reference: Runner,
    candidate: Runner,
    inputs: Sequence[np.ndarray],
    plan: ParityPlan,
    policy: ParityPolicy,
) -> ParityReport:
    """Run both on every input batch and compare by ``plan`` under ``policy``."""
    forced = hasattr(reference, "run_forced")
    report = ParityReport(candidate.backend, reference.backend, sum(len(x) for x in inputs), gate=policy.gate)
    rows = {
        name: OutputParity(name, *policy.tolerance(plan.input_size if name in plan.pixel else None))
        for name in plan.dense
    }
    box_atol = policy.tolerance(plan.input_size)[0]  # boxes are in input pixels
    decisions: dict[str, DecisionParity] = {}
    selections: dict[str, DetectionAgreement] = {}

    def sink(record: DecisionRecord | SelectionRecord) -> None:
        if isinstance(record, SelectionRecord):
            agreement = selections.setdefault(record.name, new_agreement(policy, record.name))
            ref, got = record.as_detections()
            agree_detections(ref, got, DetectionRule(0.0, record.nms_iou), agreement, policy, box_atol)
            return
        site = record.site
        row = decisions.get(site.label)
        if row is None:
            row = decisions[site.label] = DecisionParity(
                site.label,
                site.kind,
                sites=sum(1 for s in plan.sites if s.label == site.label),
                input=OutputParity(f"{site.label} input", policy.atol, policy.rtol),
                output=OutputParity(site.label, policy.atol, policy.rtol) if forced else None,
            )
        judge(record, row, policy)

    agreement = new_agreement(policy) if plan.detections is not None else None
    for images in inputs:
        got = candidate.run(images)
        if forced:
            ref = reference.run_forced(images, got, sink)  # type: ignore[attr-defined]
        else:
            ref = reference.run(images)
            for site in plan.sites:  # a runtime exposes a Sign's decision; a 1-bit layer's signs stay inside
                if site.kind == "threshold":
                    sink(DecisionRecord(site, ref[site.input], got[site.input], ref[site.output], got[site.output]))
        for name, row in rows.items():
            compare_into(row, ref[name], got[name], policy, scaled=name not in plan.pixel)
        if agreement is not None and plan.detections is not None:
            agree_detections(ref, got, plan.detections, agreement, policy, box_atol)
    report.outputs = list(rows.values())
    report.decisions = list(decisions.values())
    report.selections = list(selections.values())
    report.detections = agreement
    return report
