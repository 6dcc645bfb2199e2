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
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.errors import UserError
from tod_deploy.methods.base import DeployModel, MethodSpec, TrainingModel
from tod_deploy.nn.anchors import decode_deltas
from tod_deploy.nn.backbones.resnet import fold_batchnorm
from tod_deploy.nn.backbones.resnet_mmdet import STAGE_CHANNELS, ResNet50
from tod_deploy.nn.binary_threshold import sign_ste
from tod_deploy.nn.heads.losses import dense_loss, roi_loss
from tod_deploy.nn.heads.retina import RetinaHead, retina_anchors
from tod_deploy.nn.heads.roi import CascadeRoIHead, RCNNTestConfig, StandardRoIHead, rois_with_batch_index
from tod_deploy.nn.heads.rpn import AnchorConfig, ProposalConfig, RPNHead, flatten_head, level_anchors, propose
from tod_deploy.nn.necks.fpn import FPN
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(recipe.model) - known)
        if unknown:
            raise UserError(f"sr_tod recipe has unknown model keys {unknown}", f"allowed: {sorted(known)}")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.model.items()})
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
        mask = (sign_ste(diff - self.learnable_thresh) + 1) * 0.5
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
            cls, reg = self.bbox_head(feats)
            anchors = torch.cat(level_anchors(feats, self.bbox_head.anchors))
            logits = torch.cat([flatten_head(c, self.cfg.num_classes) for c in cls], 1)
            deltas = torch.cat([flatten_head(r, 4) for r in reg], 1)
            parts = [dense_loss(logits[i], deltas[i], anchors, t["boxes"], t["labels"], 0.5, 0.4, 0.0)
                     for i, t in enumerate(targets)]  # fmt: skip
            losses["loss_cls"] = torch.stack([p[0] for p in parts]).mean()
            losses["loss_bbox"] = torch.stack([p[1] for p in parts]).mean()
            return losses
        obj, deltas = self.rpn_head.flat(feats)
        per_level = level_anchors(feats, self.rpn_head.anchors)
        anchors = torch.cat(per_level)
        parts = [
            dense_loss(obj[i, :, None], deltas[i], anchors, t["boxes"], None, 0.7, 0.3, 0.3)
            for i, t in enumerate(targets)
        ]
        losses["loss_rpn_cls"] = torch.stack([p[0] for p in parts]).mean()
        losses["loss_rpn_bbox"] = torch.stack([p[1] for p in parts]).mean()
        with torch.no_grad():
            proposals, _, _ = propose(obj, deltas, per_level, image_hw, ProposalConfig(2000, 512, self.cfg.rpn_iou))
        losses.update(self._roi_losses(feats, proposals, targets, image_hw))
        return losses

    def _roi_losses(
        self, feats: list[Tensor], proposals: Tensor, targets: list[dict[str, Tensor]], image_hw: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Box-head losses per image (ground truths appended to the proposals, as mmdet does)."""
        cascade = isinstance(self.roi_head, CascadeRoIHead)
        heads = list(self.roi_head.bbox_head) if cascade else [self.roi_head.bbox_head]
        thresholds = (0.5, 0.6, 0.7)
        per_stage: list[list[tuple[Tensor, Tensor]]] = [[] for _ in heads]
        for i, target in enumerate(targets):
            image_feats = [f[i : i + 1] for f in feats[:4]]
            rois = torch.cat([proposals[i], target["boxes"]])[None]
            for stage, head in enumerate(heads):
                logits, deltas = head(self.roi_head.extractor(image_feats, rois_with_batch_index(rois)))
                per_stage[stage].append(
                    roi_loss(logits, deltas, rois[0], target["boxes"], target["labels"], self.cfg.num_classes,
                             head.stds, thresholds[stage], head.class_agnostic)
                )  # fmt: skip
                if stage < len(heads) - 1:
                    rois = decode_deltas(rois, deltas[None, :, :4], head.stds, image_hw).detach()
        losses: dict[str, Tensor] = {}
        for stage, parts in enumerate(per_stage):
            losses[f"s{stage}.loss_cls"] = torch.stack([q[0] for q in parts]).mean()
            losses[f"s{stage}.loss_bbox"] = torch.stack([q[1] for q in parts]).mean()
        return losses


class SRTODDeploy(DeployModel):
    """SR-TOD at inference: RH and DGFE kept, training loss gone, BN folded."""

    def __init__(self, net: SRTOD, recipe: Recipe) -> None:
        super().__init__()
        self.net = net
        cfg = net.cfg
        self.rcnn = RCNNTestConfig(recipe.score_threshold, cfg.nms_iou, recipe.top_k)
        self.proposal = ProposalConfig(cfg.rpn_nms_pre, cfg.rpn_max_per_img, cfg.rpn_iou)
        self.extra_names = ("diff_map", "binary_mask") if cfg.enhance else ()
        self.nms_iou = cfg.nms_iou
        if cfg.detector == "retinanet":
            self.raw_names = ("cls_logits", "bbox_deltas")
        else:
            self.raw_names = ("proposals", "roi_cls_logits", "roi_bbox_deltas")
        dense = self.raw_names if cfg.detector == "retinanet" else ("rpn_cls_logits", "rpn_bbox_deltas")
        self.parity_names = (*dense, *self.extra_names)

    def run(self, images: Tensor) -> dict[str, Tensor]:
        net, cfg = self.net, self.net.cfg
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        enhanced = net.enhanced_features(images)
        feats = enhanced["feats"]
        out: dict[str, Tensor] = {}
        if cfg.enhance:
            out.update(diff_map=enhanced["diff"], binary_mask=enhanced["mask"])
        if cfg.detector == "retinanet":
            dets, (logits, deltas) = net.bbox_head.predict(
                feats, image_hw, cfg.retina_nms_pre, self.rcnn.score_threshold, cfg.nms_iou, self.rcnn.max_per_img
            )
            out.update(cls_logits=logits, bbox_deltas=deltas)
        else:
            obj, reg = net.rpn_head.flat(feats)
            proposals, _, valid = propose(obj, reg, level_anchors(feats, net.rpn_head.anchors), image_hw, self.proposal)
            dets, (logits, deltas) = net.roi_head.predict(feats[:4], proposals, valid, image_hw, self.rcnn)
            n, p = proposals.shape[:2]
            out.update(
                rpn_cls_logits=obj,
                rpn_bbox_deltas=reg,
                proposals=proposals, roi_cls_logits=logits.view(n, p, -1), roi_bbox_deltas=deltas.view(n, p, -1),
            )  # fmt: skip
        out.update(zip(CONTRACT_OUTPUTS, dets, strict=True))
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
)
