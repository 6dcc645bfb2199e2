"""Bottom-heavy backbones (the paper's Table 4) inside Faster R-CNN-FPN, RetinaNet or FCOS.

The paper's point is the backbone: the same detectors, with a backbone whose convolutions run at
high resolution (BH-ResNet50, BH-HRNet32/18) or the standard one (ResNet50, HRNet32/18). So the
detector parts are the shared mmdet-layout ones (``neck.*``, ``rpn_head.*``, ``roi_head.*``,
``bbox_head.*``) and only ``backbone.*`` changes; BN is folded at deployment.

``faster_rcnn_sspnet`` is the detector of the only public checkpoint (BH-ResNet50 on TinyPerson,
``TinyPerson/configs/_base_/models/faster_rcnn_bh50_sspnet.py``): Faster R-CNN whose neck is
SSPNet's SSFPN (``nn/necks/ssfpn.py``); the recipe's ``tinyperson`` variant carries the rest of
that model (1 class, 12 anchors per location, soft-NMS at test time).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
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
from tod_deploy.nn.necks.ssfpn import SSFPN
from tod_deploy.nn.soft_nms import METHODS as SOFT_NMS_METHODS
from tod_deploy.nn.soft_nms import SoftNMSConfig
from tod_deploy.recipes import Recipe

# The Faster R-CNN detectors differ only in their neck: each maps the four backbone maps to P2..P6.
TWO_STAGE_NECKS: dict[str, Callable[[list[int]], nn.Module]] = {
    "faster_rcnn": lambda channels: FPN(channels, 256, 5, extra="pool"),
    "faster_rcnn_sspnet": lambda channels: SSFPN(channels, 256, 5),
}
DETECTORS = (*TWO_STAGE_NECKS, "retinanet", "fcos")
NMS_TYPES = ("nms", "soft_nms")
BACKBONES = tuple(TABLE4)
FCOS_STRIDES = (8, 16, 32, 64, 128)  # mmdet FCOS: P3..P7, extra convs on the FPN output


@dataclass(frozen=True)
class BHConfig:
    backbone: str = "bh_resnet50"
    detector: str = "faster_rcnn"
    num_classes: int = 8
    anchor_scale: float | tuple[float, ...] = 8.0  # RPN anchor scale(s): mmdet's ``scales`` (default base 8)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # RPN anchor ratios (h / w)
    rpn_nms_pre: int = 1000
    rpn_max_per_img: int = 1000
    rpn_iou: float = 0.7
    nms_iou: float = 0.5  # final NMS IoU; soft-NMS's iou_threshold with nms_type soft_nms
    nms_type: str = "nms"  # nms | soft_nms (mmcv's, Faster R-CNN detectors only)
    soft_nms_method: str = "linear"  # linear | gaussian
    soft_nms_sigma: float = 0.5  # gaussian only
    soft_nms_min_score: float = 1e-3  # mmcv's default; decayed scores below it are dropped
    soft_nms_candidates: int = 1000  # N: soft-NMS sees the N best candidates (exact if no more pass the score cut)
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
        cfg.check_nms()
        return cfg

    def check_nms(self) -> None:
        if self.nms_type not in NMS_TYPES:
            raise UserError(f"unknown nms_type {self.nms_type!r} for bh", f"choose one of: {', '.join(NMS_TYPES)}")
        if self.nms_type == "nms":
            return
        if self.detector not in TWO_STAGE_NECKS:
            raise UserError(
                f"nms_type soft_nms is for the Faster R-CNN detectors, not {self.detector}",
                f"use nms_type: nms, or --detector {' or '.join(TWO_STAGE_NECKS)}",
            )
        if self.soft_nms_method not in SOFT_NMS_METHODS:
            raise UserError(
                f"unknown soft_nms_method {self.soft_nms_method!r}", f"choose one of: {', '.join(SOFT_NMS_METHODS)}"
            )
        if self.soft_nms_candidates <= 0:
            raise UserError("soft_nms_candidates must be positive", "set it to e.g. 1000 in the recipe")

    def anchors(self) -> AnchorConfig:
        scales = self.anchor_scale if isinstance(self.anchor_scale, tuple) else (self.anchor_scale,)
        return AnchorConfig(scales=tuple(map(float, scales)), ratios=tuple(map(float, self.anchor_ratios)))

    def soft_nms(self) -> SoftNMSConfig | None:
        """The R-CNN stage's soft-NMS, or None for hard NMS."""
        if self.nms_type != "soft_nms":
            return None
        return SoftNMSConfig(
            iou_threshold=self.nms_iou, min_score=self.soft_nms_min_score, method=self.soft_nms_method,
            sigma=self.soft_nms_sigma, candidates=self.soft_nms_candidates,
        )  # fmt: skip


class BH(TrainingModel):
    """Backbone + neck (mmdet FPN, or SSFPN for ``faster_rcnn_sspnet``) + the chosen detector's heads."""

    def __init__(self, cfg: BHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        channels = list(self.backbone.out_channels)
        if cfg.detector in TWO_STAGE_NECKS:
            self.neck = TWO_STAGE_NECKS[cfg.detector](channels)
            self.rpn_head = RPNHead(256, cfg.anchors())
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
        fold_batchnorm(net.neck)  # SSFPN's context attention has one BN
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
        super().__init__(net, recipe, FCOS_STRIDES, net.cfg.rpn_iou, net.cfg.backbone, soft_nms=net.cfg.soft_nms())

    def backbone_paper(self, input_size: tuple[int, int]) -> dict[str, Any]:
        """Table 4 counts the backbone alone at 640x512; multiply-adds scale with H*W, so either orientation."""
        if sorted(input_size) != [512, 640]:
            return {}
        params_m, gmacs = TABLE4[self.net.cfg.backbone]
        return {"params_m": params_m, "gmacs": gmacs, "input_size": list(input_size),
                "source": "bottom-heavy paper, Table 4 (backbone only, 640x512)"}  # fmt: skip


def build(recipe: Recipe) -> BH:
    return BH(BHConfig.from_recipe(recipe))


def check_neck_keys(keys: set[str], model: nn.Module) -> None:
    """An SSPNet checkpoint (``neck.CAM.*``) needs the SSFPN neck, and a plain FPN one the FPN: say which
    recipe setting to change, rather than listing dozens of missing or unexpected keys."""
    has_cam = any(k.startswith("neck.CAM.") for k in keys)
    wants_cam = isinstance(getattr(model, "neck", None), SSFPN)
    if has_cam and not wants_cam:
        raise UserError(
            "the checkpoint's neck is SSPNet's SSFPN (neck.CAM.* keys), the recipe builds an FPN",
            "use --preset tinyperson for the public BH-ResNet50 TinyPerson model, or --detector faster_rcnn_sspnet",
        )
    if wants_cam and not has_cam and any(k.startswith("neck.") for k in keys):
        raise UserError(
            "the checkpoint's neck is a plain FPN (no neck.CAM.* keys), the recipe builds SSFPN",
            "use --detector faster_rcnn (or retinanet / fcos, as the checkpoint was trained)",
        )


SPEC = MethodSpec(
    name="bh",
    summary="Bottom-heavy backbones (BH-ResNet50, BH-HRNet32/18 and their standard twins) in Faster R-CNN, "
    "RetinaNet or FCOS; the public TinyPerson model (Faster R-CNN + SSFPN, soft-NMS)",
    build=build,
    map_checkpoint_key=lambda key: key,
    training_only_prefixes=(),
    check_checkpoint_keys=check_neck_keys,
    class_tensors=(
        "roi_head.bbox_head.fc_cls.weight",
        "bbox_head.retina_cls.weight",
        "bbox_head.conv_cls.weight",
    ),
)
