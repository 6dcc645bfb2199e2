"""ThumbDet: a learned 4x (or 2x) down-sampler in front of a Deformable-DETR R50 student.

Training form (paper section 3): the student sees the learned thumbnail; a frozen teacher (the
same Deformable-DETR at full resolution) guides it by logit distillation over the queries the
Query Filter keeps and by feature-map distillation on C3..C5; the moment-matching loss keeps the
thumbnail's colour statistics those of the image. Only the student survives ``deploy()``.

Key layout follows the public code (a Deformable-DETR fork): the down-sampler lives at
``backbone.0.down_sample.{0,2}.weight`` beside ``backbone.0.body.*``; the teacher, if a checkpoint
carries it, under ``teacher.``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.errors import UserError
from tod_deploy.methods.base import DeployModel, MethodSpec, TrainingModel, model_config
from tod_deploy.nn.backbones.resnet import RESNET50_CHANNELS, fold_batchnorm, resnet50_body
from tod_deploy.nn.deformable_detr import DeformableDETR, DeformableDETRConfig
from tod_deploy.nn.detr_criterion import SetCriterion
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS, detr_topk
from tod_deploy.recipes import Recipe


@dataclass(frozen=True)
class ThumbDetConfig(DeformableDETRConfig):
    scale: int = 4
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Paper section 4.1: lambda 0.1, gamma 1, T 1; Query Filter threshold 0.5 (Algorithm 1).
    mm_lambda: float = 0.1
    mm_weight: float = 1.0
    kd_temperature: float = 1.0
    kd_logit_weight: float = 1.0
    kd_feature_weight: float = 1.0
    query_filter_threshold: float = 0.5

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> ThumbDetConfig:
        cfg = model_config(cls, recipe)
        if cfg.scale not in (1, 2, 4):
            raise UserError(f"thumbdet scale must be 4, 2 or 1, got {cfg.scale}", "use --scale 4 or --scale 2")
        return cfg


def down_sampler(scale: int) -> nn.Sequential | None:
    """Paper Fig. 3 (4x: two 3x3 stride-2 convs, 12 then 3 channels) and section 4.2 (2x: 5x5)."""
    if scale == 4:
        return nn.Sequential(
            nn.Conv2d(3, 12, 3, stride=2, padding=1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(12, 3, 3, stride=2, padding=1, bias=False), nn.ReLU(inplace=True),
        )  # fmt: skip
    if scale == 2:
        return nn.Sequential(
            nn.Conv2d(3, 12, 5, stride=1, padding=1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(12, 3, 5, stride=2, padding=1, bias=False), nn.ReLU(inplace=True),
        )  # fmt: skip
    return None


class ThumbBackbone(nn.Module):
    """[0, 1] image -> (learned thumbnail) -> ImageNet normalization -> ResNet-50 C3, C4, C5."""

    def __init__(self, cfg: ThumbDetConfig) -> None:
        super().__init__()
        sampler = down_sampler(cfg.scale)
        if sampler is not None:
            self.down_sample = sampler
        self.body = resnet50_body(("layer2", "layer3", "layer4"))
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def thumbnail(self, images01: Tensor) -> Tensor:
        return self.down_sample(images01) if hasattr(self, "down_sample") else images01

    def forward(self, images01: Tensor) -> list[Tensor]:
        x = (self.thumbnail(images01) - self.mean) / self.std
        return list(self.body(x).values())


def build_detector(cfg: ThumbDetConfig) -> DeformableDETR:
    channels = [RESNET50_CHANNELS[name] for name in ("layer2", "layer3", "layer4")]
    detr_cfg = DeformableDETRConfig(**{f.name: getattr(cfg, f.name) for f in fields(DeformableDETRConfig)})
    return DeformableDETR(ThumbBackbone(cfg), channels, detr_cfg)


def freeze_stem(detector: DeformableDETR) -> None:
    """Upstream trains ResNet from layer2 on (conv1 and layer1 frozen); the down-sampler trains."""
    body = detector.backbone[0].body
    for name, param in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            param.requires_grad_(False)


def moment_matching_loss(images01: Tensor, thumbnail: Tensor, lam: float) -> Tensor:
    """Eq. 5: per-channel mean and standard deviation of the thumbnail match the image's."""
    mu_x, mu_y = images01.mean(dim=(2, 3)), thumbnail.mean(dim=(2, 3))
    sd_x, sd_y = images01.std(dim=(2, 3)), thumbnail.std(dim=(2, 3))
    return ((mu_x - mu_y) ** 2 + lam * (sd_x - sd_y) ** 2).mean()


def query_filter(teacher_logits: Tensor, threshold: float) -> Tensor:
    """Algorithm 1: keep the queries whose best teacher class probability exceeds the threshold."""
    return teacher_logits.sigmoid().max(dim=-1).values > threshold


def logit_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, keep: Tensor, t: float) -> Tensor:
    """Eq. 7 on the kept queries only: KL(softmax(p_t / T) || softmax(p_s / T))."""
    if not bool(keep.any()):
        return student_logits.sum() * 0.0
    s, te = student_logits[keep] / t, teacher_logits[keep] / t
    return F.kl_div(F.log_softmax(s, -1), F.softmax(te, -1), reduction="batchmean") * t * t


def feature_distillation_loss(student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
    """Eq. 8: student C3..C5 resized (bilinear) to the teacher's size, mean squared error."""
    losses = [
        F.mse_loss(F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False), t)
        for s, t in zip(student_feats, teacher_feats, strict=True)
    ]
    return torch.stack(losses).mean()


class ThumbDetDeploy(DeployModel):
    """The student alone: images 0..255 -> thumbnail -> Deformable-DETR -> top-K detections."""

    raw_names = ("pred_logits", "pred_boxes")
    parity_names = raw_names
    backbone_path = "detector.backbone.0.body"

    def __init__(self, detector: DeformableDETR, top_k: int, score_threshold: float) -> None:
        super().__init__()
        self.detector = detector
        self.top_k = top_k
        self.score_threshold = score_threshold

    def run(self, images: Tensor) -> dict[str, Tensor]:
        out = self.detector(images / 255.0)
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        contract = detr_topk(logits, boxes, image_hw, self.top_k, self.score_threshold)
        return {**dict(zip(CONTRACT_OUTPUTS, contract, strict=True)), "pred_logits": logits, "pred_boxes": boxes}

    def complexity_parts(self) -> dict[str, str]:
        parts = {"down-sampler": "detector.backbone.0.down_sample"}
        if not hasattr(self.detector.backbone[0], "down_sample"):
            parts = {}
        return parts | {
            "ResNet-50": "detector.backbone.0.body",
            "input projections": "detector.input_proj",
            "encoder (6 layers)": "detector.transformer.encoder",
            "decoder (6 layers)": "detector.transformer.decoder",
        }


class ThumbDetTraining(TrainingModel):
    def __init__(self, cfg: ThumbDetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = build_detector(cfg)
        freeze_stem(self.student)
        self.teacher = build_detector(ThumbDetConfig(**{**cfg.__dict__, "scale": 1}))
        self.teacher.requires_grad_(False)
        self.criterion = SetCriterion(cfg.num_classes)

    def deploy(self, recipe: Recipe) -> ThumbDetDeploy:
        detector = copy.deepcopy(self.student).eval()
        fold_batchnorm(detector.backbone[0].body)
        detector.requires_grad_(False)
        return ThumbDetDeploy(detector, recipe.top_k, recipe.score_threshold).eval()

    def training_losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The paper's four terms. With both distillation weights at 0 (no trained teacher to learn from: the
        frozen teacher's random initial weights would only teach noise) the teacher is not run and its terms are
        left out."""
        cfg = self.cfg
        images01 = images / 255.0
        student = self.student(images01, all_layers=True)
        thumbnail = self.student.backbone[0].thumbnail(images01)
        losses = {
            "loss_mm": cfg.mm_weight * moment_matching_loss(images01, thumbnail, cfg.mm_lambda),
            "loss_det": self.criterion(student["layers"], targets),
        }
        if cfg.kd_logit_weight == 0 and cfg.kd_feature_weight == 0:
            return losses
        self.teacher.eval()
        with torch.no_grad():
            teacher = self.teacher(images01)
        keep = query_filter(teacher["pred_logits"], cfg.query_filter_threshold)
        return losses | {
            "loss_kd_logit": cfg.kd_logit_weight
            * logit_distillation_loss(student["pred_logits"], teacher["pred_logits"], keep, cfg.kd_temperature),
            "loss_kd_feature": cfg.kd_feature_weight
            * feature_distillation_loss(student["features"], teacher["features"]),
        }


def build(recipe: Recipe) -> ThumbDetTraining:
    return ThumbDetTraining(ThumbDetConfig.from_recipe(recipe))


def map_checkpoint_key(key: str) -> str:
    """Upstream checkpoints hold the student at the top level; ours nests it under ``student.``."""
    return key if key.startswith("teacher.") else f"student.{key}"


SPEC = MethodSpec(
    name="thumbdet",
    summary="ThumbDet: learned 4x/2x down-sampler + Deformable-DETR R50 (teacher is training-only)",
    build=build,
    map_checkpoint_key=map_checkpoint_key,
    training_only_prefixes=("teacher.", "criterion."),
    class_tensors=("class_embed.0.weight",),
)
