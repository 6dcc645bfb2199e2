"""The training losses' random sampling and averaging, against mmdet's RandomSampler and heads."""

from __future__ import annotations

import torch

from tod_deploy.nn.heads.losses import (
    IGNORE,
    NEGATIVE,
    RCNN_SAMPLER,
    RPN_SAMPLER,
    dense_loss,
    random_sample,
    roi_loss,
)


def _assigned(positives: int, negatives: int, ignored: int) -> torch.Tensor:
    labels = [3] * positives + [NEGATIVE] * negatives + [IGNORE] * ignored
    return torch.tensor(labels)[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]


def _counts(assigned: torch.Tensor, keep: torch.Tensor) -> tuple[int, int, int]:
    return (int((keep & (assigned >= 0)).sum()), int((keep & (assigned == NEGATIVE)).sum()),
            int((keep & (assigned == IGNORE)).sum()))  # fmt: skip


def test_random_sample_follows_mmdet_random_sampler() -> None:
    torch.manual_seed(0)
    many = _assigned(300, 5000, 100)
    assert _counts(many, random_sample(many, *RPN_SAMPLER)) == (128, 128, 0)  # positives capped at half of 256
    few = _assigned(10, 5000, 100)
    assert _counts(few, random_sample(few, *RCNN_SAMPLER)) == (10, 502, 0)  # negatives fill up to 512
    scarce = _assigned(10, 20, 100)
    assert _counts(scarce, random_sample(scarce, *RPN_SAMPLER)) == (10, 20, 0)  # never an ignored one
    # random, not the first N: two draws pick different negatives
    first, second = random_sample(few, *RCNN_SAMPLER), random_sample(few, *RCNN_SAMPLER)
    assert not torch.equal(first, second)


# One ground truth; the first box is it, the other three lie far from it (all sampled: fewer than num).
GT = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
BOXES = torch.tensor([[10.0, 10.0, 30.0, 30.0], [60.0, 60.0, 80.0, 80.0], [90, 10, 110, 30], [10, 90, 30, 110]])


def test_two_stage_box_losses_are_averaged_over_the_sample() -> None:
    """mmdet averages an RPN's and a box head's L1 over every sampled box (positives and negatives:
    AnchorHead's num_total_samples, BBoxHead's avg_factor=bbox_targets.size(0)), not over positives.
    The one positive's deltas are off by 1 in each of 4 coordinates: L1 sum 4, over 4 sampled boxes."""
    deltas = torch.zeros(4, 4)
    deltas[0] = 1.0
    _, rpn_reg = dense_loss(torch.zeros(4, 1), deltas, BOXES, GT, None, 0.7, 0.3, 0.3)
    assert float(rpn_reg) == 1.0
    logits = torch.zeros(4, 2)
    _, rcnn_reg = roi_loss(logits, deltas, BOXES, GT, torch.tensor([0]), 1, (0.1, 0.1, 0.2, 0.2), 0.5, True)
    assert float(rcnn_reg) == 1.0
    # RetinaNet (no sampling) averages its focal and L1 losses over the positives: 4 / 1
    _, retina_reg = dense_loss(torch.zeros(4, 1), deltas, BOXES, GT, torch.tensor([0]), 0.5, 0.4, 0.0)
    assert float(retina_reg) == 4.0
