"""CFINet's Feature Imitation loss (training only): tiny objects' RoI features are pulled towards
those of high-quality instances of their class.

Per ground truth, its *instance quality* is the mean of IoU x class score over the proposals
assigned to it. High-quality instances (quality >= 0.65 with >= 8 proposals) are exemplars: their
RoI features go to a per-class queue, and their boxes, shifted and rescaled, give extra views of
themselves. Each ground truth's compressed RoI feature is then the anchor of a supervised
contrastive loss in the Feat2Embed space: positives are same-class exemplars (or, for a
high-quality instance, its own augmented views), negatives are proposals of other labels.
Follows the public code's FIRoIHead (queue in memory rather than in files).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tod_deploy.nn.heads.fi_roi import FIRoIHead


@dataclass(frozen=True)
class ImitationConfig:
    temperature: float = 0.6
    loss_weight: float = 0.5
    queue_size: int = 256  # exemplars kept per class
    samples: int = 128  # contrast samples per ground truth
    pos_fraction: tuple[float, float] = (0.5, 0.25)  # of `samples`, for low / mid quality instances
    min_score: float = 0.05  # proposals scoring below this do not count towards quality
    hq_score: float = 0.65
    lq_score: float = 0.25
    hq_min_proposals: int = 8
    quality_weights: tuple[float, float, float] = (0.5, 0.1, 0.05)  # loss weight for low / mid / high
    shift_ratios: tuple[float, ...] = (0.3, 0.5)
    rescale_ratios: tuple[float, ...] = (0.97, 1.03)


class ExemplarQueue:
    """Per class, the last ``size`` RoI features [K, C, 7, 7] of high-quality instances."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.feats: dict[int, Tensor] = {}

    def push(self, label: int, feats: Tensor) -> None:
        kept = torch.cat([self.feats[label], feats.detach()]) if label in self.feats else feats.detach()
        self.feats[label] = kept[-self.size :]

    def get(self, label: int) -> Tensor | None:
        return self.feats.get(label)


def instance_quality(
    scores: Tensor, ious: Tensor, owner: Tensor, num_gts: int, min_score: float
) -> tuple[Tensor, Tensor]:
    """Mean IoU x score and the count of the proposals assigned to each ground truth.

    scores/ious/owner [P] describe the positive proposals (score of their ground truth's class).
    """
    used = scores >= min_score
    one_hot = F.one_hot(owner[used], num_gts).to(scores.dtype)  # [P', G]
    total = (ious[used] * scores[used]) @ one_hot
    count = one_hot.sum(dim=0)
    return total / count.clamp(min=1), count


def augmented_boxes(
    boxes: Tensor, image_hw: tuple[int, int], shift_ratios: tuple[float, ...], rescale_ratios: tuple[float, ...]
) -> Tensor:
    """[G, 4] -> [G, 4 * len(shift) + len(rescale), 4]: shifted right/down/left/up, then rescaled."""
    wh = boxes[:, 2:] - boxes[:, :2]
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], device=boxes.device)
    views = []
    for r in shift_ratios:
        shift = (wh[:, None, :] * directions[None] * r).repeat(1, 1, 2)  # [G, 4, 4]
        views.append(boxes[:, None, :] + shift)
    centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    for s in rescale_ratios:
        views.append(torch.cat([centre - wh * s * 0.5, centre + wh * s * 0.5], dim=-1)[:, None])
    h, w = image_hw
    bound = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(torch.cat(views, dim=1).clamp(min=0), bound)


def supervised_contrastive(
    anchor: Tensor, contrast: Tensor, positive: Tensor, present: Tensor, weights: Tensor, temperature: float
) -> Tensor:
    """anchor [G, D], contrast [G, S, D] (unit vectors), positive/present [G, S] masks, weights [G]."""
    sim = (anchor[:, None, :] * contrast).sum(-1) / temperature
    sim = sim.masked_fill(~present, -1e4)  # finite: a row with no samples must not turn into NaN
    logits = sim - sim.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (positive & present).to(anchor.dtype)
    per_gt = -(log_prob * pos).sum(1)
    per_gt = per_gt / (pos.sum(1) + 1e-6 * (pos.sum(1) == 0))
    return (weights * per_gt).mean()


def _choose(candidates: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    if candidates.numel() <= k:
        return candidates
    return candidates[torch.randperm(candidates.numel(), generator=generator)[:k].to(candidates.device)]


@dataclass
class ImageRoIs:
    """One image's sampled RoIs, ground truths first (as mmdet's sampler puts them)."""

    feats: list[Tensor]  # pyramid of this image, each [1, C, H, W]
    gt_boxes: Tensor  # [G, 4]
    gt_labels: Tensor  # [G]
    roi_feats: Tensor  # [R, C, 7, 7] pooled, before re-weighting
    comp: Tensor  # [R, C] compressed features
    logits: Tensor  # [R, num_classes + 1]
    assigned: Tensor  # [R] ground truth index or negative
    ious: Tensor  # [R] IoU with the assigned ground truth
    image_hw: tuple[int, int]


def imitation_loss(
    head: FIRoIHead, rois: ImageRoIs, queue: ExemplarQueue, cfg: ImitationConfig, num_classes: int,
    generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    g = rois.gt_boxes.shape[0]
    if g == 0:
        return rois.comp.sum() * 0.0
    is_gt_row = torch.arange(rois.comp.shape[0], device=rois.comp.device) < g
    positive = (rois.assigned >= 0) & ~is_gt_row
    owner = rois.assigned[positive]
    probs = F.softmax(rois.logits[positive].detach(), dim=-1)
    scores = probs.gather(1, rois.gt_labels[owner][:, None]).squeeze(1)
    quality, count = instance_quality(scores, rois.ious[positive], owner, g, cfg.min_score)
    high = (quality >= cfg.hq_score) & (count >= cfg.hq_min_proposals)
    grade = (quality >= cfg.lq_score).long() + (quality >= cfg.hq_score).long()

    labels = torch.where(rois.assigned >= 0, rois.gt_labels[rois.assigned.clamp(min=0)], num_classes)
    rows, row_labels, kinds, owners = [rois.comp], [labels], [torch.zeros_like(labels)], [torch.full_like(labels, -1)]
    with torch.no_grad():
        for label in rois.gt_labels.unique().tolist():
            exemplars = queue.get(label)
            if exemplars is not None:
                rows.append(head.compress(exemplars))
                row_labels.append(torch.full((exemplars.shape[0],), label, device=labels.device))
                kinds.append(torch.ones_like(row_labels[-1]))
                owners.append(torch.full_like(row_labels[-1], -1))
        if high.any():
            index = high.nonzero().squeeze(1)
            views = augmented_boxes(rois.gt_boxes[index], rois.image_hw, cfg.shift_ratios, cfg.rescale_ratios)
            rows.append(head.compress(head.pool(rois.feats, views.reshape(1, -1, 4))))
            per_gt = views.shape[1]
            row_labels.append(rois.gt_labels[index].repeat_interleave(per_gt))
            kinds.append(torch.full_like(row_labels[-1], 2))
            owners.append(index.repeat_interleave(per_gt))
    table = torch.cat(rows)
    row_labels, kinds, owners = torch.cat(row_labels), torch.cat(kinds), torch.cat(owners)

    samples, is_positive = [], []
    for gt in range(g):
        label = rois.gt_labels[gt]
        if grade[gt] == 2:
            pos = (owners == gt).nonzero().squeeze(1)
        else:
            limit = int(cfg.samples * cfg.pos_fraction[int(grade[gt])])
            pos = _choose(((kinds == 1) & (row_labels == label)).nonzero().squeeze(1), limit, generator)
        neg = _choose(((kinds == 0) & (row_labels != label)).nonzero().squeeze(1), cfg.samples - pos.numel(), generator)
        samples.append(torch.cat([pos, neg]))
        is_positive.append(torch.arange(samples[-1].numel(), device=pos.device) < pos.numel())
    width = max(max(s.numel() for s in samples), 1)
    index = torch.zeros(g, width, dtype=torch.long, device=table.device)
    present = torch.zeros(g, width, dtype=torch.bool, device=table.device)
    positive_mask = torch.zeros_like(present)
    for gt, (s, p) in enumerate(zip(samples, is_positive, strict=True)):
        index[gt, : s.numel()], present[gt, : s.numel()], positive_mask[gt, : s.numel()] = s, True, p

    embedded = head.embed(table)
    weights = torch.tensor(cfg.quality_weights, device=table.device, dtype=table.dtype)[grade]
    loss = supervised_contrastive(embedded[:g], embedded[index], positive_mask, present, weights, cfg.temperature)
    for gt in high.nonzero().squeeze(1).tolist():
        queue.push(int(rois.gt_labels[gt]), rois.roi_feats[gt : gt + 1])
    return cfg.loss_weight * loss
