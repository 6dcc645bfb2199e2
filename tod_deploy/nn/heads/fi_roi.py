"""CFINet's RoI head (``FIRoIHead``): RoIAlign, channel re-weighting by three GN convs, Shared2FC.

What runs at inference: the three 3x3 convs (padding 0, GroupNorm 32, no activation) squeeze a
7x7 RoI feature to 1x1; a softmax over its channels re-weights the RoI feature by (1 + w). What
is training-only: ``fc_enc`` and ``fc_proj`` (Feat2Embed, the projection the supervised
contrastive Feature Imitation loss works in) and the exemplar queue; ``without_imitation()``
drops them, so the deploy graph cannot hold them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.nn.heads.roi import (
    RCNNTestConfig,
    RoIExtractor,
    Shared2FCBBoxHead,
    detections_from_rois,
    rois_with_batch_index,
)


class GNConvModule(nn.Module):
    """mmcv ConvModule(3x3, norm GN(32), act None): keys ``conv.weight`` (no bias), ``gn.{weight,bias}``."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, bias=False)
        self.gn = nn.GroupNorm(groups, channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(self.conv(x))


class FIRoIHead(nn.Module):
    """Keys ``roi_head.comp_convs.{0,1,2}``, ``roi_head.bbox_head.*``; training-only
    ``roi_head.fc_enc.{0,1}`` and ``roi_head.fc_proj``."""

    def __init__(
        self, num_classes: int, channels: int = 256, roi_size: int = 7, enc_dim: int = 512, proj_dim: int = 128,
        strides: tuple[int, ...] = (4, 8, 16, 32),
    ) -> None:  # fmt: skip
        super().__init__()
        self.extractor = RoIExtractor(strides, roi_size)
        self.comp_convs = nn.ModuleList(GNConvModule(channels) for _ in range(roi_size // 2))
        self.bbox_head = Shared2FCBBoxHead(num_classes, channels, roi_size)
        self.fc_enc: nn.ModuleList | None = nn.ModuleList([nn.Linear(channels, enc_dim), nn.Linear(enc_dim, enc_dim)])
        self.fc_proj: nn.Linear | None = nn.Linear(enc_dim, proj_dim)
        for fc in (*self.fc_enc, self.fc_proj):
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)

    def compress(self, roi_feats: Tensor) -> Tensor:
        """[R, C, 7, 7] -> [R, C]: the 1x1 map the re-weighting and the imitation loss both use."""
        x = roi_feats
        for conv in self.comp_convs:
            x = conv(x)
        return x.flatten(1)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Class logits, box deltas, and the compressed features (for the imitation loss)."""
        comp = self.compress(roi_feats)
        weights = F.softmax(comp, dim=1)[:, :, None, None] + 1
        logits, deltas = self.bbox_head(roi_feats * weights)
        return logits, deltas, comp

    def pool(self, feats: list[Tensor], boxes: Tensor) -> Tensor:
        """RoI features of boxes [N, P, 4] from the pyramid (P2..P5)."""
        return self.extractor(feats, rois_with_batch_index(boxes))

    def embed(self, comp: Tensor) -> Tensor:
        """Feat2Embed: the unit-length embedding the contrastive loss compares (training only)."""
        if self.fc_enc is None or self.fc_proj is None:
            raise RuntimeError("the deploy view has no Feature Imitation branch")
        x = comp
        for fc in self.fc_enc:
            x = F.relu(fc(x))
        return F.normalize(self.fc_proj(x), dim=-1)

    def without_imitation(self) -> FIRoIHead:
        self.fc_enc, self.fc_proj = None, None
        return self

    def predict(
        self, feats: list[Tensor], proposals: Tensor, valid: Tensor, image_hw: tuple[int, int], cfg: RCNNTestConfig
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor]]:
        logits, deltas, _ = self(self.pool(feats, proposals))
        return detections_from_rois(proposals, logits, deltas, valid, self.bbox_head, image_hw, cfg), (logits, deltas)
