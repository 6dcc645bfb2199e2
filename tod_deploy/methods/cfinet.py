"""CFINet (ICCV 2023): coarse-to-fine RPN and Feature Imitation on Faster R-CNN R50-FPN.

At inference: ResNet-50, FPN P2..P5, the two-stage RPN (dilated conv refines one anchor per
location; a deformable conv, its offsets computed from the refined anchors, classifies), and
the RoI head with its GroupNorm-conv channel re-weighting. Training-only, dropped by
``deploy()``: Feat2Embed (``roi_head.fc_enc``, ``roi_head.fc_proj``), the exemplar queue, the
Feature Imitation loss and the area-based anchor mining of the RPN's first stage.

Keys follow the public code (mmdet 2): ``backbone.*``, ``neck.*`` (4 outputs, no extra level),
``rpn_head.stages.0.rpn_conv.conv.*``, ``rpn_head.stages.0.rpn_reg.*``,
``rpn_head.stages.1.rpn_{conv.conv,cls,reg}.*``, ``roi_head.comp_convs.{0,1,2}.{conv,gn}.*``,
``roi_head.bbox_head.*``, ``roi_head.fc_enc.{0,1}.*``, ``roi_head.fc_proj.*``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from tod_deploy.methods.base import DeployModel, MethodSpec, TrainingModel, model_config
from tod_deploy.nn.backbones.resnet import fold_batchnorm
from tod_deploy.nn.backbones.resnet_mmdet import STAGE_CHANNELS, ResNet50
from tod_deploy.nn.detectors import TWO_STAGE_RAW
from tod_deploy.nn.heads.crpn import CoarseToFineRPN, CRPNConfig
from tod_deploy.nn.heads.crpn_loss import crpn_losses
from tod_deploy.nn.heads.feature_imitation import ExemplarQueue, ImageRoIs, ImitationConfig, imitation_loss
from tod_deploy.nn.heads.fi_roi import FIRoIHead
from tod_deploy.nn.heads.losses import roi_loss
from tod_deploy.nn.heads.roi import RCNNTestConfig
from tod_deploy.nn.heads.rpn import ProposalConfig
from tod_deploy.nn.necks.fpn import FPN
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
from tod_deploy.recipes import Recipe

# Dense tensors compared element by element: stage 0's regression, the anchors it refines
# (decoded and clipped: they set the deformable conv's offsets), stage 1's logits and deltas.
CRPN_DENSE = ("rpn_refine_deltas", "refined_anchors", "rpn_cls_logits", "rpn_bbox_deltas")


@dataclass(frozen=True)
class CFINetConfig:
    num_classes: int = 9
    anchor_scale: float = 2.0
    rpn_nms_pre: int = 1000
    rpn_max_per_img: int = 300
    rpn_iou: float = 0.5
    nms_iou: float = 0.5
    train_rpn_iou: float = 0.8  # rpn_proposal NMS in training
    # Training only. Stage 0 averages its IoU loss over the input's anchors / 200 (mmdet's Cascade RPN);
    # set (H, W) to average over the anchors of that input instead, e.g. upstream's 1216x1216 when
    # training on much smaller images of objects of the same pixel size (see crpn_losses).
    stage0_average_hw: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def crpn(self) -> CRPNConfig:
        proposal = ProposalConfig(self.rpn_nms_pre, self.rpn_max_per_img, self.rpn_iou)
        return CRPNConfig(anchor_scale=self.anchor_scale, proposal=proposal)


class CFINet(TrainingModel):
    def __init__(self, cfg: CFINetConfig, imitation: ImitationConfig | None = None) -> None:
        super().__init__()
        self.cfg, self.imitation = cfg, imitation or ImitationConfig()
        self.backbone = ResNet50()
        self.backbone.freeze_stem()
        self.neck = FPN(list(STAGE_CHANNELS), 256, 4, extra="pool")
        self.rpn_head = CoarseToFineRPN(256, cfg.crpn())
        self.roi_head = FIRoIHead(cfg.num_classes)
        self.exemplars = ExemplarQueue(self.imitation.queue_size)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def features(self, images: Tensor) -> list[Tensor]:
        return self.neck(self.backbone((images - self.mean) / self.std))

    def stage0_average_anchors(self, image_hw: tuple[int, int]) -> int:
        """Anchors per image that stage 0's loss is averaged over: one per location of every level."""
        h, w = self.cfg.stage0_average_hw or image_hw
        return sum(math.ceil(h / s) * math.ceil(w / s) for s in self.rpn_head.cfg.strides)

    def deploy(self, recipe: Recipe) -> CFINetDeploy:
        net = copy.deepcopy(self).eval()
        net.roi_head.without_imitation()
        net.exemplars = ExemplarQueue(0)
        fold_batchnorm(net.backbone)
        net.requires_grad_(False)
        return CFINetDeploy(net, recipe).eval()

    def training_losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        feats = self.features(images)
        rpn = self.rpn_head(feats, image_hw)
        losses = crpn_losses(rpn, targets, self.stage0_average_anchors(image_hw))
        with torch.no_grad():
            train_cfg = ProposalConfig(self.cfg.rpn_nms_pre, self.cfg.rpn_max_per_img, self.cfg.train_rpn_iou)
            proposals, _, valid = self.rpn_head.proposals(rpn, image_hw, train_cfg)
        cls, reg, imitation = [], [], []
        for i, target in enumerate(targets):
            gt, labels = target["boxes"], target["labels"]
            rois = torch.cat([gt, proposals[i][valid[i]]])  # ground truths first, as mmdet's sampler
            image_feats = [f[i : i + 1] for f in feats]
            roi_feats = self.roi_head.pool(image_feats, rois[None])
            logits, deltas, comp = self.roi_head(roi_feats)
            c, r = roi_loss(logits, deltas, rois, gt, labels, self.cfg.num_classes, self.roi_head.bbox_head.stds,
                            0.5, False)  # fmt: skip
            cls.append(c)
            reg.append(r)
            ious, assigned = assign_rois(rois, gt)
            sample = ImageRoIs(image_feats, gt, labels, roi_feats, comp, logits, assigned, ious, image_hw)
            imitation.append(
                imitation_loss(self.roi_head, sample, self.exemplars, self.imitation, self.cfg.num_classes)
            )
        return losses | {
            "loss_cls": torch.stack(cls).mean(),
            "loss_bbox": torch.stack(reg).mean(),
            "loss_con": torch.stack(imitation).mean(),
        }


def assign_rois(rois: Tensor, gt: Tensor, iou_threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Each RoI's IoU with its best ground truth, and that ground truth's index (-1 below the threshold)."""
    if gt.numel() == 0:
        return rois.new_zeros(rois.shape[0]), torch.full((rois.shape[0],), -1, dtype=torch.long, device=rois.device)
    ious, best = box_iou(rois, gt).max(dim=1)
    return ious, torch.where(ious >= iou_threshold, best, torch.full_like(best, -1))


class CFINetDeploy(DeployModel):
    """CFINet at inference: Feature Imitation gone, BN folded, everything else kept."""

    raw_names = TWO_STAGE_RAW
    parity_names = CRPN_DENSE
    pixel_outputs = ("refined_anchors",)
    backbone_path = "net.backbone"

    def __init__(self, net: CFINet, recipe: Recipe) -> None:
        super().__init__()
        self.net = net
        self.rcnn = RCNNTestConfig(recipe.score_threshold, net.cfg.nms_iou, recipe.top_k)
        self.nms_iou = net.cfg.nms_iou

    def run(self, images: Tensor) -> dict[str, Tensor]:
        net = self.net
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        feats = net.features(images)
        rpn = net.rpn_head(feats, image_hw)
        proposals, scores, valid = net.rpn_head.proposals(rpn, image_hw)
        dets, (logits, deltas) = net.roi_head.predict(feats, proposals, valid, image_hw, self.rcnn)
        n, p = proposals.shape[:2]
        return {
            **dict(zip(CONTRACT_OUTPUTS, dets, strict=True)),
            "rpn_refine_deltas": rpn.refine_deltas, "refined_anchors": rpn.refined,
            "rpn_cls_logits": rpn.objectness, "rpn_bbox_deltas": rpn.deltas, "proposals": proposals,
            "proposal_scores": scores,
            "roi_cls_logits": logits.view(n, p, -1), "roi_bbox_deltas": deltas.view(n, p, -1),
        }  # fmt: skip

    def complexity_parts(self) -> dict[str, str]:
        return {
            "ResNet-50": "net.backbone", "FPN": "net.neck", "coarse-to-fine RPN": "net.rpn_head",
            "RoI head": "net.roi_head",
        }  # fmt: skip


def build(recipe: Recipe) -> CFINet:
    return CFINet(model_config(CFINetConfig, recipe))


SPEC = MethodSpec(
    name="cfinet",
    summary="CFINet: coarse-to-fine RPN (anchor-guided DeformConv) + RoI re-weighting, Faster R-CNN R50-FPN",
    build=build,
    map_checkpoint_key=lambda key: key,
    training_only_prefixes=("roi_head.fc_enc.", "roi_head.fc_proj."),
    class_tensors=("roi_head.bbox_head.fc_cls.weight",),
)
