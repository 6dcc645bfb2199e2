"""DFR-Det (ICML 2024): 1-bit detectors on a Bi-Real ResNet-18, with a training-only decoder.

Inference graph: 1-bit ResNet-18 (real stem and downsample shortcuts) -> FPN P2..P6 (real, which
is what the paper's 15.47 MB size figure implies) -> FCOS head with 1-bit tower convs and real
last layers (or RetinaNet / Faster R-CNN heads, real). Training form adds the DFR decoder
(deconv + bilinear up-sampling of P2..P4, residual blocks, linear to 12 channels, pixel shuffle
x2), the DFR loss (L1 to the image inside ground-truth boxes, L1 to zero outside) and the
weight reconstruction loss; ``deploy()`` drops all three.

No public code exists; options of ``BinaryConv2d`` (alpha, padding value, sign(0)) follow the
nearest public codebases and are recorded with the export so it is exact for each.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.errors import UserError
from tod_deploy.methods.base import MethodSpec, TrainingModel, model_config
from tod_deploy.methods.fpn_detector import FPNDetectorDeploy
from tod_deploy.nn.backbones.resnet import fold_batchnorm
from tod_deploy.nn.backbones.resnet18_binary import STAGE_CHANNELS, ResNet18, binary_conv3x3, real_conv3x3
from tod_deploy.nn.binary import BinaryConv2d
from tod_deploy.nn.detectors import (
    retina_losses,
    two_stage_losses,
)
from tod_deploy.nn.heads.fcos import FCOSHead, TowerBlock, fcos_points, real_tower_conv
from tod_deploy.nn.heads.fcos_loss import fcos_loss
from tod_deploy.nn.heads.retina import RetinaHead, retina_anchors
from tod_deploy.nn.heads.roi import StandardRoIHead
from tod_deploy.nn.heads.rpn import AnchorConfig, RPNHead
from tod_deploy.nn.necks.fpn import FPN
from tod_deploy.recipes import Recipe

STRIDES = (4, 8, 16, 32, 64)
DETECTORS = ("fcos", "retinanet", "faster_rcnn")


@dataclass(frozen=True)
class DFRDetConfig:
    detector: str = "fcos"  # fcos | retinanet | faster_rcnn
    binary: bool = True  # False: the real-valued twin, for comparisons
    num_classes: int = 8
    alpha: str = "mean_abs"  # mean_abs (ReActNet, BiDet) | learned (IDa-Det)
    pad_value: int = 0  # 0 (ReActNet, IDa-Det) | -1 (BiDet) | 1
    zero_sign: int = -1  # the paper's sign(0) = -1; torch.sign-based codebases: 0
    nms_pre: int = 1000
    nms_iou: float = 0.5
    rpn_nms_pre: int = 1000
    rpn_max_per_img: int = 1000
    dfr_weight: float = 1.0
    weight_rec_weight: float = 1e-4
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> DFRDetConfig:
        cfg = model_config(cls, recipe)
        if cfg.detector not in DETECTORS:
            raise UserError(f"unknown detector {cfg.detector!r} for dfr_det", f"choose one of: {', '.join(DETECTORS)}")
        return cfg

    def binary_options(self) -> dict[str, object]:
        return {"alpha": self.alpha, "pad_value": self.pad_value, "zero_sign": self.zero_sign}


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class DFRDecoder(nn.Module):
    """P2, P3, P4 -> stride 4 (deconv, then bilinear for P4) -> concat -> residual blocks ->
    linear to 12 channels -> pixel shuffle x2: an RGB image at half the input resolution."""

    def __init__(self, channels: int = 256, mid: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.up3 = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
        self.up4 = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
        self.fuse = nn.Conv2d(3 * channels, mid, 1)
        self.blocks = nn.Sequential(*(ResidualBlock(mid) for _ in range(blocks)))
        self.to_pixels = nn.Conv2d(mid, 12, 1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, p2: Tensor, p3: Tensor, p4: Tensor) -> Tensor:
        size = p2.shape[-2:]
        up3 = F.interpolate(self.up3(p3), size=size, mode="bilinear", align_corners=False)
        up4 = F.interpolate(self.up4(p4), size=size, mode="bilinear", align_corners=False)
        x = self.blocks(self.fuse(torch.cat([p2, up3, up4], 1)))
        return self.shuffle(self.to_pixels(x))


def box_mask(targets: list[dict[str, Tensor]], size: tuple[int, int], stride: float) -> Tensor:
    """1 inside any ground-truth box, 0 elsewhere, at the decoder's resolution: [N, 1, H, W]."""
    h, w = size
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * stride
    masks = []
    for t in targets:
        m = torch.zeros(h, w)
        for x1, y1, x2, y2 in t["boxes"].tolist():
            m[((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]] = 1.0
        masks.append(m)
    return torch.stack(masks)[:, None]


def weight_reconstruction_loss(model: nn.Module) -> Tensor:
    """sum over 1-bit layers of mean (W - alpha sign W)^2 (LWS-Det / IDa-Det's weight term)."""
    terms = [((m.weight - m.scale().view(-1, 1, 1, 1) * torch.sign(m.weight)) ** 2).mean()
             for m in model.modules() if isinstance(m, BinaryConv2d)]  # fmt: skip
    return torch.stack(terms).sum() if terms else torch.zeros(())


class DFRDet(TrainingModel):
    def __init__(self, cfg: DFRDetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        options = cfg.binary_options()
        conv = binary_conv3x3(options) if cfg.binary else real_conv3x3
        self.backbone = ResNet18(conv, bireal=cfg.binary)
        self.neck = FPN(list(STAGE_CHANNELS), 256, 5, extra="pool" if cfg.detector == "faster_rcnn" else "on_output")
        tower = (lambda cin, cout: BinaryConv2d(cin, cout, 3, padding=1, **options)) if cfg.binary else real_tower_conv
        if cfg.detector == "fcos":
            self.bbox_head = FCOSHead(cfg.num_classes, STRIDES, tower, binary=cfg.binary)
        elif cfg.detector == "retinanet":  # P2..P6, as the paper uses for every detector
            anchors = AnchorConfig(STRIDES, retina_anchors().scales, (0.5, 1.0, 2.0))
            block = (lambda: TowerBlock(256, tower, binary=True)) if cfg.binary else None
            self.bbox_head = RetinaHead(cfg.num_classes, anchors, tower=block)
        else:  # heads stay real-valued: only the backbone is 1-bit in this form
            self.rpn_head = RPNHead(256, AnchorConfig())
            self.roi_head = StandardRoIHead(cfg.num_classes)
        self.decoder = DFRDecoder(256)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def features(self, images: Tensor) -> list[Tensor]:
        return self.neck(self.backbone((images - self.mean) / self.std))

    def deploy(self, recipe: Recipe) -> DFRDetDeploy:
        net = copy.deepcopy(self).eval()
        del net.decoder  # training-only
        fold_batchnorm(net.backbone)
        if hasattr(net, "bbox_head"):  # 1-bit head towers: BN into the kernels' alpha and bias
            fold_batchnorm(net.bbox_head)
        net.requires_grad_(False)
        return DFRDetDeploy(net, recipe).eval()

    def training_losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        feats = self.features(images)
        cfg = self.cfg
        if cfg.detector == "fcos":
            logits, distances, centerness = self.bbox_head(feats)
            losses = fcos_loss(logits, distances, centerness, fcos_points(feats, STRIDES), targets)
        elif cfg.detector == "retinanet":
            losses = retina_losses(self.bbox_head, feats, targets, cfg.num_classes)
        else:
            image_hw = (int(images.shape[-2]), int(images.shape[-1]))
            losses = two_stage_losses(self.rpn_head, self.roi_head, feats, targets, image_hw, cfg.num_classes, 0.7)
        recon = self.decoder(*feats[:3])
        image = F.avg_pool2d(images / 255.0, 2)[..., : recon.shape[-2], : recon.shape[-1]]
        mask = box_mask(targets, tuple(recon.shape[-2:]), 2.0).to(images.device)
        # Eq. 10: L1 to the image on the foreground, L1 to zero on the background.
        losses["loss_dfr"] = self.cfg.dfr_weight * (recon - mask * image).abs().mean()
        losses["loss_weight_rec"] = self.cfg.weight_rec_weight * weight_reconstruction_loss(self)
        return losses


class DFRDetDeploy(FPNDetectorDeploy):
    def __init__(self, net: DFRDet, recipe: Recipe) -> None:
        super().__init__(net, recipe, STRIDES, 0.7, "ResNet-18")


def check_binary_options(keys: set[str], model: nn.Module) -> None:
    """A learned alpha (IDa-Det style) or threshold in the checkpoint must be one in the model too."""
    for name, module in model.named_modules():
        if not isinstance(module, BinaryConv2d):
            continue
        has_alpha = f"{name}.alpha" in keys
        if has_alpha != (module.alpha is not None):
            found = "a learned alpha" if has_alpha else "no alpha (alpha = mean|W|)"
            wanted = "learned" if has_alpha else "mean_abs"
            raise UserError(
                f"checkpoint layer {name} has {found}, but the recipe builds alpha={module.alpha_mode}",
                f"set model.alpha: {wanted} in the recipe to match the checkpoint's codebase",
            )
        if (f"{name}.threshold" in keys) != (module.threshold is not None):
            raise UserError(
                f"checkpoint layer {name} disagrees with the recipe on a learned input threshold (RSign)",
                "use the recipe options the checkpoint was trained with",
            )


def build(recipe: Recipe) -> DFRDet:
    return DFRDet(DFRDetConfig.from_recipe(recipe))


SPEC = MethodSpec(
    name="dfr_det",
    summary="DFR-Det: 1-bit FCOS / RetinaNet / Faster R-CNN on a Bi-Real ResNet-18; the DFR decoder is training-only",
    build=build,
    map_checkpoint_key=lambda key: key,
    training_only_prefixes=("decoder.",),
    check_checkpoint_keys=check_binary_options,
    class_tensors=(
        "bbox_head.conv_cls.weight",
        "bbox_head.retina_cls.weight",
        "roi_head.bbox_head.fc_cls.weight",
    ),
)
