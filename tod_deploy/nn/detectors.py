"""Heads assembled into detectors - inference outputs and training losses - shared by methods.

A method keeps its heads as its own attributes (``rpn_head``/``roi_head`` or ``bbox_head``, the
mmdet key layout); these functions run them. Inference returns every named tensor a deploy
model exposes: the contract, the raw head outputs, and the dense pre-NMS tensors parity uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tod_deploy.nn.anchors import decode_deltas
from tod_deploy.nn.heads.losses import dense_loss, roi_loss
from tod_deploy.nn.heads.retina import RetinaHead
from tod_deploy.nn.heads.roi import CascadeRoIHead, RCNNTestConfig, rois_with_batch_index
from tod_deploy.nn.heads.rpn import ProposalConfig, RPNHead, flatten_head, level_anchors, propose
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS

TWO_STAGE_RAW = ("proposals", "roi_cls_logits", "roi_bbox_deltas")
TWO_STAGE_DENSE = ("rpn_cls_logits", "rpn_bbox_deltas")
RETINA_RAW = ("cls_logits", "bbox_deltas")


@dataclass(frozen=True)
class TestSettings:
    proposal: ProposalConfig
    rcnn: RCNNTestConfig  # score threshold, NMS IoU and max detections of the final stage
    retina_nms_pre: int = 1000


def retina_outputs(head: RetinaHead, feats: list[Tensor], image_hw: tuple[int, int], cfg: TestSettings) -> dict:
    rcnn = cfg.rcnn
    dets, (logits, deltas) = head.predict(
        feats, image_hw, cfg.retina_nms_pre, rcnn.score_threshold, rcnn.iou_threshold, rcnn.max_per_img
    )
    return {**dict(zip(CONTRACT_OUTPUTS, dets, strict=True)), "cls_logits": logits, "bbox_deltas": deltas}


def two_stage_outputs(
    rpn_head: RPNHead, roi_head: nn.Module, feats: list[Tensor], image_hw: tuple[int, int], cfg: TestSettings
) -> dict:
    obj, reg = rpn_head.flat(feats)
    proposals, scores, _ = propose(obj, reg, level_anchors(feats, rpn_head.anchors), image_hw, cfg.proposal)
    proposals, scores = rpn_head.selected(proposals, scores, cfg.proposal.iou_threshold)
    dets, (logits, deltas) = roi_head.predict(feats[:4], proposals, scores >= 0, image_hw, cfg.rcnn)
    n, p = proposals.shape[:2]
    return {
        **dict(zip(CONTRACT_OUTPUTS, dets, strict=True)),
        "rpn_cls_logits": obj, "rpn_bbox_deltas": reg, "proposals": proposals, "proposal_scores": scores,
        "roi_cls_logits": logits.view(n, p, -1), "roi_bbox_deltas": deltas.view(n, p, -1),
    }  # fmt: skip


def retina_losses(
    head: RetinaHead, feats: list[Tensor], targets: list[dict[str, Tensor]], num_classes: int
) -> dict[str, Tensor]:
    cls, reg = head(feats)
    anchors = torch.cat(level_anchors(feats, head.anchors))
    logits = torch.cat([flatten_head(c, num_classes) for c in cls], 1)
    deltas = torch.cat([flatten_head(r, 4) for r in reg], 1)
    parts = [dense_loss(logits[i], deltas[i], anchors, t["boxes"], t["labels"], 0.5, 0.4, 0.0)
             for i, t in enumerate(targets)]  # fmt: skip
    return {
        "loss_cls": torch.stack([p[0] for p in parts]).mean(),
        "loss_bbox": torch.stack([p[1] for p in parts]).mean(),
    }


def two_stage_losses(
    rpn_head: RPNHead, roi_head: nn.Module, feats: list[Tensor], targets: list[dict[str, Tensor]],
    image_hw: tuple[int, int], num_classes: int, rpn_iou: float,
) -> dict[str, Tensor]:  # fmt: skip
    obj, deltas = rpn_head.flat(feats)
    per_level = level_anchors(feats, rpn_head.anchors)
    anchors = torch.cat(per_level)
    parts = [dense_loss(obj[i, :, None], deltas[i], anchors, t["boxes"], None, 0.7, 0.3, 0.3)
             for i, t in enumerate(targets)]  # fmt: skip
    losses = {
        "loss_rpn_cls": torch.stack([p[0] for p in parts]).mean(),
        "loss_rpn_bbox": torch.stack([p[1] for p in parts]).mean(),
    }
    with torch.no_grad():
        proposals, _, _ = propose(obj, deltas, per_level, image_hw, ProposalConfig(2000, 512, rpn_iou))
    losses.update(roi_losses(roi_head, feats, proposals, targets, image_hw, num_classes))
    return losses


def roi_losses(
    roi_head: nn.Module, feats: list[Tensor], proposals: Tensor, targets: list[dict[str, Tensor]],
    image_hw: tuple[int, int], num_classes: int,
) -> dict[str, Tensor]:  # fmt: skip
    """Box-head losses per image (ground truths appended to the proposals, as mmdet does)."""
    cascade = isinstance(roi_head, CascadeRoIHead)
    heads = list(roi_head.bbox_head) if cascade else [roi_head.bbox_head]
    thresholds = (0.5, 0.6, 0.7)
    per_stage: list[list[tuple[Tensor, Tensor]]] = [[] for _ in heads]
    for i, target in enumerate(targets):
        image_feats = [f[i : i + 1] for f in feats[:4]]
        rois = torch.cat([proposals[i], target["boxes"]])[None]
        for stage, head in enumerate(heads):
            logits, deltas = head(roi_head.extractor(image_feats, rois_with_batch_index(rois)))
            per_stage[stage].append(
                roi_loss(logits, deltas, rois[0], target["boxes"], target["labels"], num_classes,
                         head.stds, thresholds[stage], head.class_agnostic)
            )  # fmt: skip
            if stage < len(heads) - 1:
                rois = decode_deltas(rois, deltas[None, :, :4], head.stds, image_hw).detach()
    losses: dict[str, Tensor] = {}
    for stage, parts in enumerate(per_stage):
        losses[f"s{stage}.loss_cls"] = torch.stack([q[0] for q in parts]).mean()
        losses[f"s{stage}.loss_bbox"] = torch.stack([q[1] for q in parts]).mean()
    return losses
