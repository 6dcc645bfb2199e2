"""mmcv's ``soft_nms`` as a fixed-count graph of standard ONNX ops (one ``Loop``).

What mmcv computes (``mmcv/ops/csrc/pytorch/cpu/nms.cpp``, ``softnms_cpu``; mmdet's ``soft_nms``
test setting always runs it on the CPU), restated: the candidates form a working array in input
order. Step i picks the first position >= i holding the highest current score, swaps it into
position i and outputs it with that score. Every later position then has its score multiplied by
a decay of its IoU with the pick - ``linear``: 1 - IoU where IoU >= iou_threshold, else 1;
``gaussian``: exp(-IoU^2 / sigma) - and a score that falls below ``min_score`` is removed by
moving the array's last element into its place (that element is examined there in turn).
Outputs come in pick order, so their scores never increase.

The graph form reproduces that step by step, including the swap-with-last removal (a two-pointer
compaction), because the resulting array order decides which of two equal scores is picked
first. Two fixed counts bound it:

- ``candidates`` (N): soft-NMS sees the N best-scoring valid candidates (kept in input order).
  The result is exactly mmcv's whenever at most N candidates are valid; past that, a candidate
  outside the N best cannot appear even if decays would have let it rank in the output.
- ``max_outputs`` (K): at most K picks; mmdet keeps the first ``max_per_img`` picks anyway. The
  loop stops early once every image has run out of candidates.

Each step costs O(N) (the IoU matrix, N x N per image, is computed once before the loop), so
N = 1000, K = 500 runs in tens of milliseconds on a CPU. Boxes use mmcv's ``offset = 0`` areas
(what mmdet configs use); a pair of zero-area boxes counts as IoU 0, where mmcv divides 0 by 0.
Groups (classes) never decay each other, which is what mmdet's ``batched_nms`` gets by shifting
each class's boxes apart (for class 0 the two are the same arithmetic; shifted boxes may round
differently in the last bits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

METHODS = ("linear", "gaussian")


@dataclass(frozen=True)
class SoftNMSConfig:
    """mmcv ``soft_nms`` arguments (its defaults) plus the candidate count N of the graph form."""

    iou_threshold: float = 0.3
    min_score: float = 1e-3
    method: str = "linear"  # linear | gaussian
    sigma: float = 0.5  # gaussian only
    candidates: int = 1000


def pairwise_iou(boxes: Tensor) -> Tensor:
    """[B, N, 4] -> [B, N, N] with mmcv's arithmetic (offset 0); zero-area pairs give 0."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    top_left = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    bottom_right = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area[:, :, None] + area[:, None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def decay(iou: Tensor, cfg: SoftNMSConfig) -> Tensor:
    """The factor a score is multiplied by for its IoU with a pick."""
    if cfg.method == "gaussian":
        return torch.exp(-(iou * iou) / cfg.sigma)
    return torch.where(iou >= cfg.iou_threshold, 1 - iou, torch.ones_like(iou))


def working_order(scores: Tensor, valid: Tensor, candidates: int) -> tuple[Tensor, Tensor]:
    """Indices [B, N] of the N best valid candidates in input order (valid ones first), and their count [B]."""
    n = min(candidates, scores.shape[1])
    ranked = torch.where(valid, scores, torch.full_like(scores, -float("inf")))
    top, chosen = ranked.topk(n, dim=1)
    chosen_valid = top > -float("inf")
    # Indices are below 2**24, so float keys order them exactly (TensorRT's TopK takes no int64).
    input_order = torch.where(chosen_valid, -chosen.to(scores.dtype), torch.full_like(top, -float("inf")))
    _, order = input_order.topk(n, dim=1)
    return torch.gather(chosen, 1, order), chosen_valid.sum(dim=1)


def swap(x: Tensor, positions: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Exchange the entries at positions a and b ([B, 1] each) of every row of x [B, N]."""
    at_a, at_b = torch.gather(x, 1, a), torch.gather(x, 1, b)
    return torch.where(positions == a, at_b, torch.where(positions == b, at_a, x))


def remove_with_last(
    scores: Tensor, slots: Tensor, positions: Tensor, *, survivors: Tensor, removed: Tensor
) -> tuple[Tensor, Tensor]:
    """mmcv's removal: scanning left to right, each removed entry is replaced by the last surviving
    entry to its right (removed entries at the end just shorten the array). The k-th removed
    position from the left receives the k-th surviving position from the right, if that lies
    further right. Survivors not moved keep their places."""
    as_float = positions.to(scores.dtype)
    removed_f = removed.to(scores.dtype)
    hole_rank = (torch.cumsum(removed_f, dim=1) - removed_f).to(torch.int64)
    rightmost_first, _ = torch.where(survivors, as_float, torch.full_like(scores, -1.0)).topk(scores.shape[1], dim=1)
    source = torch.gather(rightmost_first, 1, hole_rank)
    filled = removed & (source > as_float)
    take = torch.where(filled, source.to(torch.int64), positions)
    return torch.gather(scores, 1, take), torch.gather(slots, 1, take)


def soft_nms(
    boxes: Tensor, scores: Tensor, valid: Tensor, groups: Tensor, cfg: SoftNMSConfig, *, max_outputs: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft-NMS per image and group: boxes [B, M, 4], scores / valid / groups [B, M].

    Returns, per image, the first ``max_outputs`` picks: index into M [B, K] (0 past the picks),
    decayed scores [B, K] (0 past the picks) and which entries are picks [B, K] (a prefix).
    """
    index, count = working_order(scores, valid, cfg.candidates)
    b, n = index.shape
    work_boxes = torch.gather(boxes, 1, index[..., None].expand(b, n, 4))
    work_groups = torch.gather(groups, 1, index)
    iou = pairwise_iou(work_boxes)
    iou = torch.where(work_groups[:, :, None] == work_groups[:, None, :], iou, torch.zeros_like(iou))
    positions = torch.arange(n, device=scores.device).view(1, n)
    outputs = torch.arange(max_outputs, device=scores.device).view(1, max_outputs)

    def step(i: Tensor, work: Tensor, slots: Tensor, used: Tensor, picks: Tensor, picked: Tensor) -> tuple[Tensor, ...]:
        """One mmcv iteration: ``work`` holds current scores in working-array order, ``slots`` which
        candidate (0..N-1) sits at each position, ``used`` the array length per image. An image with
        nothing left to pick is never written to again, so its arrays go unguarded."""
        live = i < used  # [B]: images with something left to pick
        in_use = positions < used[:, None]
        here = i.view(1, 1).expand(work.shape[0], 1)  # not the outer batch size: dynamo cannot close over it
        pickable = torch.where(in_use & (positions >= i), work, torch.full_like(work, -float("inf")))
        best = pickable.argmax(1, keepdim=True)  # the first maximum, as mmcv's strict '<' scan finds it
        work, slots = swap(work, positions, here, best), swap(slots, positions, here, best)
        pick, pick_score = torch.gather(slots, 1, here), torch.gather(work, 1, here)
        overlap = torch.gather(iou, 1, pick[..., None].expand(-1, -1, n)).squeeze(1)
        rest = in_use & (positions > i)
        work = torch.where(rest, work * decay(torch.gather(overlap, 1, slots), cfg), work)
        removed = rest & (work < cfg.min_score)
        survivors = rest & ~removed
        work, slots = remove_with_last(work, slots, positions, survivors=survivors, removed=removed)
        write = (outputs == i) & live[:, None]
        return (
            i + 1,
            work,
            slots,
            torch.where(live, i + 1 + survivors.sum(dim=1), used),
            torch.where(write, pick, picks),
            torch.where(write, pick_score, picked),
        )

    def more(i: Tensor, work: Tensor, slots: Tensor, used: Tensor, picks: Tensor, picked: Tensor) -> Tensor:
        return (i < max_outputs) & (i < used).any()

    state = (
        torch.zeros((), dtype=torch.int64, device=scores.device),
        torch.gather(scores, 1, index),
        positions.expand(b, n).clone(),
        count,
        torch.full((b, max_outputs), -1, dtype=torch.int64, device=scores.device),
        torch.zeros((b, max_outputs), dtype=scores.dtype, device=scores.device),
    )
    *_, picks, picked = run_loop(more, step, state)
    keep = picks >= 0
    chosen = torch.gather(index, 1, picks.clamp(min=0))
    return torch.where(keep, chosen, torch.zeros_like(chosen)), picked, keep


def run_loop(
    more: Callable[..., Tensor], step: Callable[..., tuple[Tensor, ...]], state: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """``torch.while_loop`` while exporting (one ONNX ``Loop``); a plain Python loop otherwise.

    Why not always ``torch.while_loop``: in eager mode it compiles its body with dynamo on every new
    shape, which costs seconds; the two drivers run the very same ``step``.
    """
    if torch.compiler.is_exporting():
        return tuple(torch.while_loop(more, step, state))
    while bool(more(*state)):
        state = step(*state)
    return state
