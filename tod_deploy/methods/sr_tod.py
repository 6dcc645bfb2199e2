"""SR-TOD (ECCV 2024): a reconstruction head and the difference-map guided feature enhancement.

The reconstruction head (RH) turns the finest pyramid level back into an image; where it fails
(difference map D = mean_c |I_r - I_o| above a learnable threshold t) tiny objects are likely,
and DGFE boosts those positions of that level: mask = (sign(D - t) + 1) / 2 resized by nearest,
s = sigmoid(mlp(avgpool P) + mlp(maxpool P)), P' = P*s*mask + P*s. All of it stays at inference;
only the reconstruction loss is training-only. In training sign() passes gradients straight
through; in the export it is plain ONNX ``Sign``.

Keys follow the public code (mmdet 3): ``backbone.*``, ``neck.*``, ``rpn_head.*``,
``roi_head.bbox_head[.i].*`` or ``bbox_head.*``, ``rh.up1.up.weight``,
``rh.up1.conv.double_conv.{0,2}.weight``, ``rh.out_conv.conv.0.*``, ``dgfe.mlp.{1,3}.*`` and the
top-level scalar ``learnable_thresh``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.errors import UserError
from tod_deploy.methods.base import DeployModel, MethodSpec, TrainingModel, model_config
from tod_deploy.nn.backbones.resnet import fold_batchnorm
from tod_deploy.nn.backbones.resnet_mmdet import STAGE_CHANNELS, ResNet50
from tod_deploy.nn.binary_threshold import ThresholdSign
from tod_deploy.nn.detectors import (
    RETINA_RAW,
    TWO_STAGE_DENSE,
    TWO_STAGE_RAW,
    TestSettings,
    retina_losses,
    retina_outputs,
    two_stage_losses,
    two_stage_outputs,
)
from tod_deploy.nn.heads.retina import RetinaHead, retina_anchors
from tod_deploy.nn.heads.roi import CascadeRoIHead, RCNNTestConfig, StandardRoIHead
from tod_deploy.nn.heads.rpn import AnchorConfig, ProposalConfig, RPNHead
from tod_deploy.nn.necks.fpn import FPN
from tod_deploy.recipes import Recipe

DETECTORS = ("faster_rcnn", "cascade_rcnn", "retinanet")


@dataclass(frozen=True)
class SRTODConfig:
    detector: str = "faster_rcnn"
    num_classes: int = 8
    anchor_scale: float = 4.0
    thresh_init: float = 3 / 255
    rpn_nms_pre: int = 3000
    rpn_max_per_img: int = 3000
    rpn_iou: float = 0.7
    nms_iou: float = 0.5
    retina_nms_pre: int = 1000
    enhance: bool = True  # False: the same detector without RH + DGFE (the paper's baseline)
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> SRTODConfig:
        cfg = model_config(cls, recipe)
        if cfg.detector not in DETECTORS:
            raise UserError(f"unknown detector {cfg.detector!r} for sr_tod", f"choose one of: {', '.join(DETECTORS)}")
        return cfg


class Up(nn.Module):
    """TransposedConv(4, stride 2) then two 3x3 conv + ReLU (keys ``up``, ``conv.double_conv.{0,2}``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
        self.conv = nn.Module()
        self.conv.double_conv = nn.Sequential(
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.ReLU(inplace=True),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.conv.double_conv(self.up(x))


class ReconstructionHead(nn.Module):
    """256-channel stride-4 map -> RGB image in [0, 1] at 4x its size."""

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        self.up1 = Up(channels, channels // 2)
        self.up2 = Up(channels // 2, channels // 4)
        self.out_conv = nn.Module()
        self.out_conv.conv = nn.Sequential(nn.Conv2d(channels // 4, 3, 3, padding=1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.out_conv.conv(self.up2(self.up1(x)))


class DGFE(nn.Module):
    """Difference-map guided feature enhancement (channel weights shared by avg and max pooling)."""

    def __init__(self, channels: int = 256, reduction: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, reduction), nn.ReLU(inplace=True), nn.Linear(reduction, channels)
        )

    def forward(self, feat: Tensor, mask: Tensor) -> Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(feat, 1))
        mx = self.mlp(F.adaptive_max_pool2d(feat, 1))
        s = torch.sigmoid(avg + mx)[:, :, None, None]
        mask = F.interpolate(mask, size=feat.shape[-2:], mode="nearest")
        return feat * s * mask + feat * s


class SRTOD(TrainingModel):
    """The detector as trained: backbone, FPN, RH, DGFE, threshold and the detector's heads."""

    def __init__(self, cfg: SRTODConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet50()
        self.backbone.freeze_stem()
        if cfg.detector == "retinanet":
            self.neck = FPN(list(STAGE_CHANNELS), 256, 5, start_level=1, extra="on_input")
            self.bbox_head = RetinaHead(cfg.num_classes, retina_anchors())
        else:
            self.neck = FPN(list(STAGE_CHANNELS), 256, 5, extra="pool")
            self.rpn_head = RPNHead(256, AnchorConfig(scales=(cfg.anchor_scale,)))
            head = CascadeRoIHead if cfg.detector == "cascade_rcnn" else StandardRoIHead
            self.roi_head = head(cfg.num_classes)
        if cfg.enhance:
            self.rh = ReconstructionHead(256)
            self.dgfe = DGFE(256)
            self.learnable_thresh = nn.Parameter(torch.tensor(float(cfg.thresh_init)))
            self.mask_sign = ThresholdSign()
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def enhanced_features(self, images: Tensor) -> dict[str, object]:
        """Pyramid with its finest level enhanced, plus the reconstruction, D and the mask."""
        feats = self.neck(self.backbone((images - self.mean) / self.std))
        if not self.cfg.enhance:
            return {"feats": feats}
        recon = self.rh(feats[0])
        if recon.shape[-2:] != images.shape[-2:]:  # RetinaNet reconstructs from P3 (stride 8 -> 2)
            recon = F.interpolate(recon, size=images.shape[-2:], mode="bilinear", align_corners=False)
        original = images / 255.0
        diff = (recon - original).abs().mean(dim=1, keepdim=True)
        mask = (self.mask_sign(diff - self.learnable_thresh) + 1) * 0.5
        feats = [self.dgfe(feats[0], mask), *feats[1:]]
        return {"feats": feats, "recon": recon, "original": original, "diff": diff, "mask": mask}

    def deploy(self, recipe: Recipe) -> SRTODDeploy:
        net = copy.deepcopy(self).eval()
        fold_batchnorm(net.backbone)
        net.requires_grad_(False)
        return SRTODDeploy(net, recipe).eval()

    def training_losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        out = self.enhanced_features(images)
        feats = out["feats"]
        losses = {"loss_rec": F.mse_loss(out["recon"], out["original"])} if self.cfg.enhance else {}
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        if self.cfg.detector == "retinanet":
            return losses | retina_losses(self.bbox_head, feats, targets, self.cfg.num_classes)
        return losses | two_stage_losses(
            self.rpn_head, self.roi_head, feats, targets, image_hw, self.cfg.num_classes, self.cfg.rpn_iou
        )


class SRTODDeploy(DeployModel):
    """SR-TOD at inference: RH and DGFE kept, training loss gone, BN folded."""

    def __init__(self, net: SRTOD, recipe: Recipe) -> None:
        super().__init__()
        self.net = net
        self.backbone_path = "net.backbone"
        cfg = net.cfg
        self.settings = TestSettings(
            ProposalConfig(cfg.rpn_nms_pre, cfg.rpn_max_per_img, cfg.rpn_iou),
            RCNNTestConfig(recipe.score_threshold, cfg.nms_iou, recipe.top_k),
            cfg.retina_nms_pre,
        )
        self.extra_names = ("diff_map", "binary_mask") if cfg.enhance else ()
        self.nms_iou = cfg.nms_iou
        retina = cfg.detector == "retinanet"
        self.raw_names = RETINA_RAW if retina else TWO_STAGE_RAW
        self.parity_names = (*(RETINA_RAW if retina else TWO_STAGE_DENSE), *self.extra_names)

    def run(self, images: Tensor) -> dict[str, Tensor]:
        net = self.net
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        enhanced = net.enhanced_features(images)
        feats = enhanced["feats"]
        if net.cfg.detector == "retinanet":
            out = retina_outputs(net.bbox_head, feats, image_hw, self.settings)
        else:
            out = two_stage_outputs(net.rpn_head, net.roi_head, feats, image_hw, self.settings)
        if net.cfg.enhance:
            out.update(diff_map=enhanced["diff"], binary_mask=enhanced["mask"])
        return out

    def complexity_parts(self) -> dict[str, str]:
        heads = {"RetinaNet head": "net.bbox_head"} if self.net.cfg.detector == "retinanet" else {
            "RPN head": "net.rpn_head", "RoI head": "net.roi_head"}  # fmt: skip
        enhance = {"reconstruction head": "net.rh", "DGFE": "net.dgfe"} if self.net.cfg.enhance else {}
        return {"ResNet-50": "net.backbone", "FPN": "net.neck", **enhance, **heads}


def build(recipe: Recipe) -> SRTOD:
    return SRTOD(SRTODConfig.from_recipe(recipe))


SPEC = MethodSpec(
    name="sr_tod",
    summary="SR-TOD: reconstruction head + DGFE (learnable-threshold Sign) on Faster/Cascade R-CNN or RetinaNet",
    build=build,
    map_checkpoint_key=lambda key: key,
    training_only_prefixes=(),
    class_tensors=(
        "roi_head.bbox_head.fc_cls.weight",
        "roi_head.bbox_head.0.fc_cls.weight",
        "bbox_head.retina_cls.weight",
    ),
)
