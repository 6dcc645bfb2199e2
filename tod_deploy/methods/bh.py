"""Bottom-heavy backbones (the paper's Table 4) inside Faster R-CNN-FPN, RetinaNet or FCOS.

The paper's point is the backbone: the same detectors, with a backbone whose convolutions run at
high resolution (BH-ResNet50, BH-HRNet32/18) or the standard one (ResNet50, HRNet32/18). So the
detector parts are the shared mmdet-layout ones (``neck.*``, ``rpn_head.*``, ``roi_head.*``,
``bbox_head.*``) and only ``backbone.*`` changes; BN is folded at deployment.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tod_deploy.errors import UserError
from tod_deploy.methods.base import MethodSpec, TrainingModel, model_config
from tod_deploy.methods.fpn_detector import FPNDetectorDeploy
from tod_deploy.nn.backbones.bottom_heavy import TABLE4, build_backbone
from tod_deploy.nn.backbones.resnet import fold_batchnorm
from tod_deploy.nn.detectors import (
    retina_losses,
    two_stage_losses,
)
from tod_deploy.nn.heads.fcos import FCOSHead, fcos_points
from tod_deploy.nn.heads.fcos_loss import fcos_loss
from tod_deploy.nn.heads.retina import RetinaHead, retina_anchors
from tod_deploy.nn.heads.roi import StandardRoIHead
from tod_deploy.nn.heads.rpn import AnchorConfig, RPNHead
from tod_deploy.nn.necks.fpn import FPN
from tod_deploy.recipes import Recipe

DETECTORS = ("faster_rcnn", "retinanet", "fcos")
BACKBONES = tuple(TABLE4)
FCOS_STRIDES = (8, 16, 32, 64, 128)  # mmdet FCOS: P3..P7, extra convs on the FPN output


@dataclass(frozen=True)
class BHConfig:
    backbone: str = "bh_resnet50"
    detector: str = "faster_rcnn"
    num_classes: int = 8
    anchor_scale: float = 8.0  # RPN anchor scale (mmdet's default base 8)
    rpn_nms_pre: int = 1000
    rpn_max_per_img: int = 1000
    rpn_iou: float = 0.7
    nms_iou: float = 0.5
    nms_pre: int = 1000  # RetinaNet / FCOS candidates per level
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> BHConfig:
        cfg = model_config(cls, recipe)
        if cfg.detector not in DETECTORS:
            raise UserError(f"unknown detector {cfg.detector!r} for bh", f"choose one of: {', '.join(DETECTORS)}")
        if cfg.backbone not in BACKBONES:
            raise UserError(f"unknown backbone {cfg.backbone!r} for bh", f"choose one of: {', '.join(BACKBONES)}")
        return cfg


class BH(TrainingModel):
    """Backbone + mmdet FPN + the chosen detector's heads."""

    def __init__(self, cfg: BHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        channels = list(self.backbone.out_channels)
        if cfg.detector == "faster_rcnn":
            self.neck = FPN(channels, 256, 5, extra="pool")
            self.rpn_head = RPNHead(256, AnchorConfig(scales=(cfg.anchor_scale,)))
            self.roi_head = StandardRoIHead(cfg.num_classes)
        elif cfg.detector == "retinanet":
            self.neck = FPN(channels, 256, 5, start_level=1, extra="on_input")
            self.bbox_head = RetinaHead(cfg.num_classes, retina_anchors())
        else:
            self.neck = FPN(channels, 256, 5, start_level=1, extra="on_output")
            self.bbox_head = FCOSHead(cfg.num_classes, FCOS_STRIDES)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> BH:
        # norm_eval (mmdet's detector configs): backbone BN statistics stay frozen in training,
        # which also keeps small batches from corrupting them.
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        return self.neck(self.backbone((images - self.mean) / self.std))

    def deploy(self, recipe: Recipe) -> BHDeploy:
        net = copy.deepcopy(self).eval()
        fold_batchnorm(net.backbone)
        net.requires_grad_(False)
        return BHDeploy(net, recipe).eval()

    def training_losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        feats = self.features(images)
        cfg = self.cfg
        if cfg.detector == "fcos":
            logits, distances, centerness = self.bbox_head(feats)
            return fcos_loss(logits, distances, centerness, fcos_points(feats, FCOS_STRIDES), targets)
        if cfg.detector == "retinanet":
            return retina_losses(self.bbox_head, feats, targets, cfg.num_classes)
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        return two_stage_losses(self.rpn_head, self.roi_head, feats, targets, image_hw, cfg.num_classes, cfg.rpn_iou)


class BHDeploy(FPNDetectorDeploy):
    def __init__(self, net: BH, recipe: Recipe) -> None:
        super().__init__(net, recipe, FCOS_STRIDES, net.cfg.rpn_iou, net.cfg.backbone)

    def backbone_paper(self, input_size: tuple[int, int]) -> dict[str, Any]:
        """Table 4 counts the backbone alone at 640x512; multiply-adds scale with H*W, so either orientation."""
        if sorted(input_size) != [512, 640]:
            return {}
        params_m, gmacs = TABLE4[self.net.cfg.backbone]
        return {"params_m": params_m, "gmacs": gmacs, "input_size": list(input_size),
                "source": "bottom-heavy paper, Table 4 (backbone only, 640x512)"}  # fmt: skip


def build(recipe: Recipe) -> BH:
    return BH(BHConfig.from_recipe(recipe))


SPEC = MethodSpec(
    name="bh",
    summary="Bottom-heavy backbones (BH-ResNet50, BH-HRNet32/18 and their standard twins) in Faster R-CNN, "
    "RetinaNet or FCOS",
    build=build,
    map_checkpoint_key=lambda key: key,
    training_only_prefixes=(),
)
