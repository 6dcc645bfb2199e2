"""The training losses' random sampling, against mmdet's RandomSampler's rules."""

from __future__ import annotations

import torch

from tod_deploy.nn.heads.losses import IGNORE, NEGATIVE, RCNN_SAMPLER, RPN_SAMPLER, random_sample


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
