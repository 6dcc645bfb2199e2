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
from tod_deploy.nn.heads.roi import RoIExtractor


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


def test_extractor_training_form_pools_exactly_as_the_exported_form() -> None:
    """RoIExtractor in training pools each level's RoIs only; the exported form pools every RoI on every
    level and masks. Values and gradients must be the same, bit for bit."""
    generator = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 8, 512 // s, 512 // s, generator=generator, requires_grad=True) for s in (4, 8, 16, 32)]
    xy = torch.rand(200, 2, generator=generator) * 520 - 10
    wh = torch.rand(200, 2, generator=generator) ** 3 * 600
    index = torch.randint(0, 2, (200, 1), generator=generator).float()
    rois = torch.cat([index, xy, xy + wh], 1)
    extractor = RoIExtractor()
    assert extractor.target_levels(rois).unique().numel() == 4  # every level in play
    outputs = {}
    for training in (False, True):
        extractor.train(training)
        pooled = extractor(feats, rois)
        grads = torch.autograd.grad((pooled**2).sum(), feats)
        outputs[training] = (pooled, grads)
    assert torch.equal(outputs[True][0], outputs[False][0])
    for got, expected in zip(outputs[True][1], outputs[False][1], strict=True):
        assert torch.equal(got, expected)
