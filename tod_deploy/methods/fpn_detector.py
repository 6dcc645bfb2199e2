"""The deploy view shared by methods that are "a backbone + FPN + one of three detectors".

DFR-Det and the bottom-heavy method differ only in their backbones; their inference graphs are
FCOS, RetinaNet or Faster R-CNN on the same heads, so one class builds the outputs of both.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tod_deploy.methods.base import DeployModel
from tod_deploy.nn.detectors import (
    RETINA_RAW,
    TWO_STAGE_DENSE,
    TWO_STAGE_RAW,
    TestSettings,
    retina_outputs,
    two_stage_outputs,
)
from tod_deploy.nn.heads.fcos import fcos_detections, fcos_points
from tod_deploy.nn.heads.roi import RCNNTestConfig
from tod_deploy.nn.heads.rpn import ProposalConfig
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
from tod_deploy.nn.soft_nms import SoftNMSConfig
from tod_deploy.recipes import Recipe

FCOS_RAW = ("cls_logits", "bbox_distances", "centerness")


class FPNDetectorDeploy(DeployModel):
    """``net`` provides ``features(images)``, ``cfg`` (detector, nms_iou, nms_pre, rpn_nms_pre,
    rpn_max_per_img) and the heads under mmdet's names (``bbox_head`` or ``rpn_head`` + ``roi_head``);
    a net with a ``roi_head`` is a Faster R-CNN, whatever its neck. ``soft_nms`` replaces the R-CNN
    stage's hard NMS (then ``cfg.nms_iou`` is soft-NMS's threshold, which parity's near-ties use)."""

    def __init__(
        self, net: Any, recipe: Recipe, fcos_strides: tuple[int, ...], rpn_iou: float, backbone_label: str,
        *, soft_nms: SoftNMSConfig | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.net = net
        cfg = net.cfg
        self.fcos_strides, self.backbone_label = fcos_strides, backbone_label
        self.backbone_path = "net.backbone"
        self.top_k, self.score_threshold = recipe.top_k, recipe.score_threshold
        self.nms_iou = cfg.nms_iou
        self.two_stage = hasattr(net, "roi_head")
        self.settings = TestSettings(
            ProposalConfig(cfg.rpn_nms_pre, cfg.rpn_max_per_img, rpn_iou),
            RCNNTestConfig(recipe.score_threshold, cfg.nms_iou, recipe.top_k, soft_nms),
            cfg.nms_pre,
        )
        if self.two_stage:
            self.raw_names, self.parity_names = TWO_STAGE_RAW, TWO_STAGE_DENSE
        elif cfg.detector == "fcos":
            self.raw_names = self.parity_names = FCOS_RAW
            self.final_score_threshold = 0.0  # FCOS cuts class probabilities, then multiplies by centerness
        else:
            self.raw_names = self.parity_names = RETINA_RAW

    def run(self, images: Tensor) -> dict[str, Tensor]:
        net = self.net
        feats = net.features(images)
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        if self.two_stage:
            return two_stage_outputs(net.rpn_head, net.roi_head, feats, image_hw, self.settings)
        if net.cfg.detector == "retinanet":
            return retina_outputs(net.bbox_head, feats, image_hw, self.settings)
        logits, distances, centerness = net.bbox_head(feats)
        dets = fcos_detections(
            logits, distances, centerness, fcos_points(feats, self.fcos_strides), image_hw, net.cfg.nms_pre,
            self.score_threshold, self.nms_iou, self.top_k,
        )  # fmt: skip
        out = dict(zip(CONTRACT_OUTPUTS, dets, strict=True))
        out.update(cls_logits=logits, bbox_distances=distances, centerness=centerness)
        return out

    def complexity_parts(self) -> dict[str, str]:
        detector = self.net.cfg.detector
        two_stage = {"RPN head": "net.rpn_head", "RoI head": "net.roi_head"}
        heads = two_stage if self.two_stage else {f"{detector} head": "net.bbox_head"}
        return {self.backbone_label: "net.backbone", type(self.net.neck).__name__: "net.neck", **heads}
