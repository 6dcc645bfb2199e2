"""Soft-NMS in the graph against a NumPy reference of mmcv's ``soft_nms`` (``soft_nms_reference.py``),
in PyTorch and in onnxruntime, on heavy-overlap cases: clusters, duplicates, chains, ties."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from soft_nms_reference import F32, mmcv_soft_nms

from tod_deploy.nn.soft_nms import SoftNMSConfig, soft_nms
from tod_deploy.trt.support import check_proto

SLOTS = 64  # candidates per image in the exported test graph (cases are padded to it)


@dataclass
class Case:
    name: str
    boxes: np.ndarray  # [M, 4]
    scores: np.ndarray  # [M]
    cfg: SoftNMSConfig


def xyxy(cx: np.ndarray, cy: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(F32)


def heavy_overlap_cases() -> Iterator[Case]:
    """Clusters of near-identical boxes, exact duplicates with tied scores, chains, and seeded mixtures."""
    rng = np.random.default_rng(7)
    linear = SoftNMSConfig(iou_threshold=0.3, min_score=0.05, method="linear", candidates=SLOTS)
    gaussian = SoftNMSConfig(iou_threshold=0.3, min_score=0.05, method="gaussian", sigma=0.5, candidates=SLOTS)
    m = 40
    cluster = xyxy(*(base + rng.normal(0, 0.5, m) for base in (50, 50, 20, 20)))
    yield Case("cluster", cluster, rng.uniform(0.06, 1, m).astype(F32), linear)
    yield Case("cluster_gaussian", cluster, rng.uniform(0.06, 1, m).astype(F32), gaussian)
    dup = np.repeat(np.array([[10, 10, 30, 30]], F32), 12, axis=0)
    yield Case("duplicates_tied", dup, np.full(12, 0.7, F32), linear)
    yield Case("duplicates_two_scores", dup, np.array([0.4, 0.9] * 6, F32), gaussian)
    x = np.arange(30, dtype=F32) * 4  # width 10, step 4: neighbours at IoU 0.43, next ones at 0.11
    chain = xyxy(x + 5, np.full(30, 5, F32), np.full(30, 10, F32), np.full(30, 10, F32))
    yield Case("chain_descending", chain, np.linspace(0.95, 0.3, 30).astype(F32), linear)
    yield Case("chain_ascending", chain, np.linspace(0.3, 0.95, 30).astype(F32), linear)
    yield Case("chain_alternating", chain, np.where(np.arange(30) % 2 == 0, 0.9, 0.8).astype(F32), linear)
    yield Case("chain_tied", chain, np.full(30, 0.5, F32), linear)
    yield Case("chain_gaussian", chain, np.linspace(0.95, 0.3, 30).astype(F32), gaussian)
    for seed in range(6):
        r = np.random.default_rng(seed)
        m = int(r.integers(20, SLOTS + 1))
        centers = r.uniform(20, 100, (3, 2))[r.integers(0, 3, m)] + r.normal(0, 2, (m, 2))
        boxes = xyxy(centers[:, 0], centers[:, 1], r.uniform(8, 30, m), r.uniform(8, 30, m))
        scores = r.choice(np.array([0.3, 0.5, 0.7, 0.9], F32), m) if seed % 2 else r.uniform(0.05, 1, m).astype(F32)
        yield Case(f"mixture_{seed}", boxes, scores, gaussian if seed == 5 else linear)


CASES = list(heavy_overlap_cases())


def reference(case: Case) -> tuple[np.ndarray, np.ndarray]:
    cfg = case.cfg
    return mmcv_soft_nms(
        case.boxes, case.scores, iou_threshold=cfg.iou_threshold, min_score=cfg.min_score, method=cfg.method,
        sigma=cfg.sigma,
    )  # fmt: skip


def run_torch(
    boxes: np.ndarray, scores: np.ndarray, cfg: SoftNMSConfig, k: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    m = len(scores)
    g = torch.zeros(1, m, dtype=torch.int64) if groups is None else torch.from_numpy(groups)[None]
    index, picked, keep = soft_nms(
        torch.from_numpy(boxes)[None], torch.from_numpy(scores)[None], torch.ones(1, m, dtype=torch.bool), g, cfg,
        max_outputs=k,
    )  # fmt: skip
    n = int(keep.sum())
    assert bool(keep[0, :n].all()) and not bool(keep[0, n:].any()), "picks must be a prefix"
    return index[0, :n].numpy(), picked[0, :n].numpy()


def assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray], method: str) -> None:
    """Same boxes in the same order; linear decay is the same float32 arithmetic, so scores are bit-equal."""
    np.testing.assert_array_equal(got[0], want[0])
    if method == "linear":
        np.testing.assert_array_equal(got[1], want[1])
    else:  # exp() may differ in the last bit between libraries
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=0)


def test_reference_by_hand() -> None:
    """The reference itself, on cases worked out by hand."""
    kw = {"iou_threshold": 0.3, "min_score": 0.05, "method": "linear"}
    # IoU 1/3 -> the second score is multiplied by 2/3.
    keep, kept = mmcv_soft_nms(np.array([[0, 0, 10, 10], [5, 0, 15, 10]], F32), np.array([0.9, 0.8], F32), **kw)
    assert keep.tolist() == [0, 1] and kept[1] == F32(0.8) * (F32(1) - F32(50 / 150))
    # Tied scores: the swap that brings the maximum (index 2) to the front puts index 1 before index 0.
    apart = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], F32)
    assert mmcv_soft_nms(apart, np.array([0.5, 0.5, 0.9], F32), **kw)[0].tolist() == [2, 1, 0]
    # A removed duplicate is replaced by the last box, which is then picked before its tie (index 2).
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], F32)
    keep, kept = mmcv_soft_nms(boxes, np.array([0.9, 0.4, 0.35, 0.35], F32), **kw)
    assert keep.tolist() == [0, 3, 2] and kept.tolist() == pytest.approx([0.9, 0.35, 0.35])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_torch_matches_mmcv(case: Case) -> None:
    want = reference(case)
    assert_same(run_torch(case.boxes, case.scores, case.cfg, SLOTS), want, case.cfg.method)
    # K outputs: the first K picks.
    got = run_torch(case.boxes, case.scores, case.cfg, 5)
    assert_same(got, (want[0][:5], want[1][:5]), case.cfg.method)


def test_candidate_limit_is_the_best_n_in_input_order() -> None:
    """The documented limit: with more valid candidates than N, soft-NMS runs on the N best."""
    case = next(c for c in CASES if c.name == "mixture_0")
    n = 16
    cfg = SoftNMSConfig(iou_threshold=0.3, min_score=0.05, method="linear", candidates=n)
    best = np.sort(np.argsort(-case.scores, kind="stable")[:n])
    keep, kept = mmcv_soft_nms(case.boxes[best], case.scores[best], iou_threshold=0.3, min_score=0.05, method="linear")
    assert_same(run_torch(case.boxes, case.scores, cfg, SLOTS), (best[keep], kept), "linear")


def test_groups_never_decay_each_other() -> None:
    """Classes as mmdet's batched_nms sees them: one soft_nms over boxes shifted apart per class. Within a
    class the result is that class's own soft-NMS, bit for bit; shifted boxes round differently in mmdet."""
    case = next(c for c in CASES if c.name == "mixture_2")  # distinct scores: no ties across classes
    groups = (np.arange(len(case.scores)) % 3).astype(np.int64)
    got = run_torch(case.boxes, case.scores, case.cfg, SLOTS, groups)
    for g in range(3):
        members = np.flatnonzero(groups == g)
        keep, kept = mmcv_soft_nms(case.boxes[members], case.scores[members], iou_threshold=0.3, min_score=0.05,
                                   method="linear")  # fmt: skip
        mine = groups[got[0]] == g
        assert_same((got[0][mine], got[1][mine]), (members[keep], kept), "linear")
    shifted = case.boxes + (groups * (case.boxes.max() + 1))[:, None].astype(F32)
    want = mmcv_soft_nms(shifted, case.scores, iou_threshold=0.3, min_score=0.05, method="linear")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=0)


class SoftNMSModule(torch.nn.Module):
    def __init__(self, cfg: SoftNMSConfig, k: int) -> None:
        super().__init__()
        self.cfg, self.k = cfg, k

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        groups = torch.zeros_like(scores, dtype=torch.int64)
        index, picked, keep = soft_nms(boxes, scores, valid, groups, self.cfg, max_outputs=self.k)
        return index, picked, keep.to(torch.int32)


def padded(case: Case) -> dict[str, np.ndarray]:
    m = len(case.scores)
    boxes = np.zeros((1, SLOTS, 4), F32)
    scores = np.zeros((1, SLOTS), F32)
    valid = np.zeros((1, SLOTS), bool)
    boxes[0, :m], scores[0, :m], valid[0, :m] = case.boxes, case.scores, True
    return {"boxes": boxes, "scores": scores, "valid": valid}


@pytest.fixture(scope="module")
def sessions() -> dict[str, tuple[onnx.ModelProto, ort.InferenceSession]]:
    """One export per decay method, batch axis dynamic; both run every case."""
    out = {}
    for method in ("linear", "gaussian"):
        cfg = SoftNMSConfig(iou_threshold=0.3, min_score=0.05, method=method, candidates=SLOTS)
        example = {k: np.concatenate([padded(CASES[0])[k], padded(CASES[1])[k]]) for k in ("boxes", "scores", "valid")}
        batch = torch.export.Dim("batch", min=1, max=8)
        with warnings.catch_warnings():  # the exporter's notes on axis names
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                SoftNMSModule(cfg, SLOTS).eval(), tuple(torch.from_numpy(v) for v in example.values()), dynamo=True,
                opset_version=18, input_names=list(example), output_names=["picks", "picked_scores", "keep"],
                dynamic_shapes={name: {0: batch} for name in example}, verbose=False,
            )  # fmt: skip
        model = program.model_proto
        model.ir_version = 10
        out[method] = (model, ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]))
    return out


def test_export_is_one_loop_of_standard_ops(sessions: dict) -> None:
    model, _ = sessions["linear"]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Loop") == 1 and all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert len(model.graph.node) < 200, len(model.graph.node)  # the steps live in the loop body, not unrolled
    onnx.checker.check_model(model, full_check=True)
    report = check_proto(model)
    assert report.ok, [row.op for row in report.problems]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_onnxruntime_matches_mmcv(sessions: dict, case: Case) -> None:
    _, session = sessions[case.cfg.method]
    index, picked, keep = session.run(None, padded(case))
    n = int(keep[0].sum())
    assert keep[0, :n].all() and not keep[0, n:].any()
    assert_same((index[0, :n], picked[0, :n]), reference(case), case.cfg.method)


def test_onnxruntime_batch_of_different_images(sessions: dict) -> None:
    """Two images with different candidate counts in one run: each gets its own result."""
    _, session = sessions["linear"]
    a, b = (next(c for c in CASES if c.name == name) for name in ("chain_alternating", "mixture_4"))
    feeds = {k: np.concatenate([padded(a)[k], padded(b)[k]]) for k in ("boxes", "scores", "valid")}
    index, picked, keep = session.run(None, feeds)
    for row, case in enumerate((a, b)):
        n = int(keep[row].sum())
        assert_same((index[row, :n], picked[row, :n]), reference(case), "linear")
