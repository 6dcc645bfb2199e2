"""Parity of an export: what to compare (a plan from the model and its file) and the ONNX check.

The comparison itself is parity/comparator.py's, shared with engines and quantized files. What
belongs to an export is the plan: the dense head tensors (NMS and top-k may legitimately reorder
near-ties, dense outputs may not differ), the tensors in input pixels, the decision sites of the
graph, and the selection rule of its detections. The export writes the parts a later check cannot
rebuild without PyTorch into the file's ``parity`` metadata, so an engine or a quantized file is
judged by the same rule as its ONNX.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import onnx

from tod_deploy.backends import ExportSource, RunnerOptions, open_runner
from tod_deploy.export.passes import expose_tensors, read_metadata
from tod_deploy.methods.base import DeployModel, selection_names
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
from tod_deploy.parity.comparator import ParityPlan, compare, verification_images
from tod_deploy.parity.decisions import DecisionSite, decision_sites
from tod_deploy.parity.detections import DetectionRule
from tod_deploy.parity.forcing import TeacherForcedRunner, decision_modules
from tod_deploy.parity.policy import FP32, PRECISION_POLICIES, ParityPolicy
from tod_deploy.parity.report import ParityReport
from tod_deploy.recipes import Recipe

PARITY_METADATA = "parity"


def parity_metadata(deploy: DeployModel, recipe: Recipe) -> dict[str, Any]:
    """The parts of an export's plan that only its PyTorch model knows, for the file's metadata."""
    threshold = recipe.score_threshold if deploy.final_score_threshold is None else deploy.final_score_threshold
    return {"pixel_tensors": list(deploy.pixel_outputs), "score_threshold": threshold, "nms_iou": deploy.nms_iou}


def has_contract(model: onnx.ModelProto) -> bool:
    outputs = {o.name for o in model.graph.output}
    return all(name in outputs for name in CONTRACT_OUTPUTS)


def plan_for(
    model: onnx.ModelProto,
    recipe: Recipe,
    dense: Sequence[str],
    sites: Sequence[DecisionSite] = (),
    rule: dict[str, Any] | None = None,
) -> ParityPlan:
    """An export's plan by its selection rule (``parity_metadata``); ``rule=None`` reads the rule from the
    file's ``parity`` metadata (engines, quantized files), or for files written before it, takes the
    recipe's threshold and no NMS rule."""
    if rule is None:
        rule = json.loads(read_metadata(model).get(PARITY_METADATA, "{}"))
    detections = DetectionRule(float(rule.get("score_threshold", recipe.score_threshold)), rule.get("nms_iou"))
    return ParityPlan(
        dense=tuple(dense),
        input_size=recipe.input_size,
        pixel=frozenset(rule.get("pixel_tensors", [])),
        sites=tuple(sites),
        detections=detections if has_contract(model) else None,
    )


def verify_onnx(
    model: onnx.ModelProto,
    deploy: DeployModel,
    recipe: Recipe,
    seeds: tuple[int, ...] = (0, 1, 2),
    policy: ParityPolicy = FP32,
    threads: int | None = None,
    backend: str = "onnxruntime",
    precision: str = "fp32",
) -> ParityReport:
    """A runtime reading the file (onnxruntime, or OpenVINO at ``precision``) against PyTorch, teacher-forced
    at every decision, on the same seeded inputs. A runtime that really runs bfloat16 is judged by the
    bf16 policy (a report, as for quantized files), whatever ``policy`` says for float32."""
    raw = list(deploy.parity_names)
    sites = decision_sites(model) if decision_modules(deploy) else []
    site_tensors = [t for site in sites for t in (site.input, site.output, site.residual) if t]
    site_tensors += selection_names(deploy)
    exposed = expose_tensors(model, list(dict.fromkeys([*raw, *site_tensors])))
    options = RunnerOptions(threads=threads, precision=precision, log=lambda _line: None)
    candidate = open_runner(backend, ExportSource.in_memory(exposed), options)
    if getattr(candidate, "precision", "f32") == "bf16":
        policy = PRECISION_POLICIES["bf16"]
    names = [*CONTRACT_OUTPUTS, *raw] if has_contract(model) else raw
    reference = TeacherForcedRunner(deploy, names, sites, threads)
    plan = plan_for(model, recipe, raw, reference.sites, parity_metadata(deploy, recipe))
    batch = 2 if recipe.batch == "dynamic" else int(recipe.batch)
    inputs = [verification_images(recipe, batch, seed) for seed in seeds]
    return compare(reference, candidate, inputs, plan, policy)
