"""The RPN's proposal step in onnxruntime against PyTorch, where a trained RPN puts many anchors:
objectness logits far below zero, whose sigmoid onnxruntime's own ``Sigmoid`` rounds to exactly 0."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from tod_deploy.nn.anchors import grid_anchors
from tod_deploy.nn.heads.rpn import ProposalConfig, objectness_scores, propose
from tod_deploy.ops.binary_conv_onnx import export_onnx

IMAGE_HW = (256, 256)
CONFIG = ProposalConfig(nms_pre=1000, max_per_img=300, iou_threshold=0.7)


class Proposals(nn.Module):
    """One level of 8 px anchors every 4 px: the step as SR-TOD's and BH's exports run it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchors", grid_anchors((64, 64), 4, [2.0], [0.5, 1.0, 2.0]))

    def forward(self, objectness: torch.Tensor, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, scores, _ = propose(objectness, deltas, [self.anchors], IMAGE_HW, CONFIG)
        return boxes, scores


def test_objectness_scores_are_the_sigmoid_to_the_last_digit() -> None:
    logits = torch.linspace(-85.0, 30.0, 4001)
    exact = torch.sigmoid(logits.double())
    torch.testing.assert_close(objectness_scores(logits).double(), exact, rtol=2e-7, atol=0.0)


def test_onnxruntime_keeps_the_proposals_pytorch_keeps_below_sigmoid_underflow() -> None:
    """Logits of -18 to -48 on all but five anchors: 12288 candidates, 1000 per level by score, 300 kept.
    Which 300 depends on the ranking among those tiny scores, so both runtimes must compute them, not 0."""
    generator = torch.Generator().manual_seed(0)
    module = Proposals().eval()
    count = module.anchors.shape[0]
    objectness = -18.0 - 30.0 * torch.rand(1, count, generator=generator)
    objectness[0, :5] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    deltas = 0.1 * torch.randn(1, count, 4, generator=generator)
    with torch.no_grad():
        expected_boxes, expected_scores = module(objectness, deltas)
    session = ort.InferenceSession(
        export_onnx(module, (objectness, deltas), "decompose").SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    feed = dict(zip([i.name for i in session.get_inputs()], [objectness.numpy(), deltas.numpy()], strict=True))
    boxes, scores = session.run(None, feed)
    assert (expected_scores[0] > 0).all() and expected_scores[0, 5:].max() < 1e-7  # the tail is in play
    assert (scores[0] > 0).all()
    np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=1e-5, atol=0.0)
    np.testing.assert_allclose(boxes, expected_boxes.numpy(), rtol=0.0, atol=1e-4)
