"""CFINet's coarse-to-fine RPN (mmdet ``CRPNHead`` with two ``StageRefineRPNHead`` stages).

Stage 0 regresses the single anchor per location with a dilated 3x3 conv and no classifier; the
decoded, clipped boxes become that location's anchor for stage 1. Stage 1 samples its 3x3
deformable conv at offsets *computed* from those refined anchors (no offset branch: the kernel's
taps are spread over the anchor box), then classifies and regresses again. Both stages read the
previous stage's ReLU output ("refined feature").

Offsets are exported as ordinary arithmetic on the anchors and the conv as ONNX ``DeformConv``
(opset 19), so onnxruntime runs the whole head with standard ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from tod_deploy.nn.anchors import decode_deltas, grid_anchors
from tod_deploy.nn.heads.fixed_offset_deform_conv import deform_conv3x3_fixed_offsets
from tod_deploy.nn.heads.rpn import ProposalConfig, SelectedProposals, flatten_head, propose

STAGE0_STDS = (0.1, 0.1, 0.5, 0.5)
STAGE1_STDS = (0.05, 0.05, 0.1, 0.1)


@dataclass(frozen=True)
class CRPNConfig:
    strides: tuple[int, ...] = (4, 8, 16, 32)
    anchor_scale: float = 2.0
    dilation: int = 3  # stage 0's conv
    proposal: ProposalConfig = ProposalConfig(nms_pre=1000, max_per_img=300, iou_threshold=0.5)


def anchor_offsets(anchors: Tensor, stride: int, feat_hw: tuple[int, int]) -> Tensor:
    """DeformConv offsets [N, 18, H, W] that put a 3x3 kernel's taps on an anchor box.

    anchors [N, H*W, 4], one per location in row-major order. Tap (ky, kx) of the output at
    (y, x) samples the feature map at y - 1 + ky + dy, x - 1 + kx + dx; the offsets below move it
    to the anchor centre plus (k - 1) half-extents, i.e. the kernel spans the box (mmdet's
    ``anchor_offset``: centre offset plus shape offset, (y, x) interleaved per tap).
    """
    n = anchors.shape[0]
    h, w = feat_hw
    taps = torch.arange(-1.0, 2.0, device=anchors.device, dtype=anchors.dtype)
    ky = taps.view(3, 1).expand(3, 3).reshape(9)
    kx = taps.view(1, 3).expand(3, 3).reshape(9)
    x1, y1, x2, y2 = anchors.unbind(-1)
    cx, cy = (x1 + x2) * 0.5 / stride, (y1 + y2) * 0.5 / stride
    half_w, half_h = (x2 - x1) / stride / 2 - 1, (y2 - y1) / stride / 2 - 1
    grid_y = torch.arange(h, device=anchors.device, dtype=anchors.dtype).view(h, 1).expand(h, w).reshape(1, -1)
    grid_x = torch.arange(w, device=anchors.device, dtype=anchors.dtype).view(1, w).expand(h, w).reshape(1, -1)
    dy = (cy - grid_y)[..., None] + half_h[..., None] * ky
    dx = (cx - grid_x)[..., None] + half_w[..., None] * kx
    offsets = torch.stack([dy, dx], dim=-1).reshape(n, h * w, 18)
    return offsets.permute(0, 2, 1).reshape(n, 18, h, w)


class AdaptiveConv(nn.Module):
    """Key level ``rpn_conv.conv``: a dilated conv (stage 0) or a deformable conv fed offsets (stage 1)."""

    def __init__(self, channels: int, deformable: bool, dilation: int) -> None:
        super().__init__()
        self.deformable = deformable
        if deformable:
            self.conv = DeformConv2d(channels, channels, 3, padding=1, bias=False)
        else:
            self.conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        nn.init.normal_(self.conv.weight, std=0.01)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor, offsets: Tensor | None) -> Tensor:
        if not self.deformable:
            return self.conv(x)
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or offsets.requires_grad:
            return self.conv(x, offsets)
        # run eagerly (training, verification's reference): the same values, a cheaper backward
        return deform_conv3x3_fixed_offsets(x, self.conv.weight, offsets)


class StageRefineRPNHead(nn.Module):
    """One stage: keys ``rpn_conv.conv.*``, ``rpn_cls.*`` (stage 1 only), ``rpn_reg.*``."""

    def __init__(self, channels: int, deformable: bool, with_cls: bool, dilation: int = 3) -> None:
        super().__init__()
        self.rpn_conv = AdaptiveConv(channels, deformable, dilation)
        self.rpn_cls = nn.Conv2d(channels, 1, 1) if with_cls else None
        self.rpn_reg = nn.Conv2d(channels, 4, 1)
        for conv in (self.rpn_cls, self.rpn_reg):
            if conv is not None:
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, offsets: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        x = F.relu(self.rpn_conv(x, offsets))
        return x, (self.rpn_cls(x) if self.rpn_cls is not None else None), self.rpn_reg(x)


@dataclass
class CRPNOutputs:
    """Everything both stages computed, levels concatenated in order (anchor order of the heads)."""

    anchors: list[Tensor]  # per level [H*W, 4]: stage 0's fixed anchors
    refined: Tensor  # [N, A, 4]: stage 0's decoded, clipped boxes = stage 1's anchors
    refine_deltas: Tensor  # [N, A, 4] stage 0 regression
    objectness: Tensor  # [N, A] stage 1 logits
    deltas: Tensor  # [N, A, 4] stage 1 regression


class CoarseToFineRPN(nn.Module):
    """``rpn_head.stages.{0,1}``."""

    def __init__(self, channels: int = 256, cfg: CRPNConfig = CRPNConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.selected = SelectedProposals()
        self.stages = nn.ModuleList(
            [
                StageRefineRPNHead(channels, deformable=False, with_cls=False, dilation=cfg.dilation),
                StageRefineRPNHead(channels, deformable=True, with_cls=True),
            ]
        )

    def forward(self, feats: list[Tensor], image_hw: tuple[int, int]) -> CRPNOutputs:
        coarse, fine = self.stages
        hws = [(int(f.shape[2]), int(f.shape[3])) for f in feats]
        anchors = [
            grid_anchors(hw, stride, [self.cfg.anchor_scale], [1.0]).to(f.device)
            for f, hw, stride in zip(feats, hws, self.cfg.strides, strict=True)
        ]
        stage0 = [coarse(f, None) for f in feats]
        # one tensor for all levels, split again below: the export keeps it as a named tensor
        refine_deltas = torch.cat([flatten_head(reg, 4) for _, _, reg in stage0], 1)
        refined, objectness, deltas = [], [], []
        for (x, _, _), d0, base, hw, stride in zip(
            stage0, refine_deltas.split([a.shape[0] for a in anchors], 1), anchors, hws, self.cfg.strides, strict=True
        ):
            boxes = decode_deltas(base.expand(d0.shape[0], -1, -1), d0.detach(), STAGE0_STDS, image_hw)
            _, cls1, reg1 = fine(x, anchor_offsets(boxes, stride, hw))
            refined.append(boxes)
            objectness.append(flatten_head(cls1, 1).squeeze(-1))
            deltas.append(flatten_head(reg1, 4))
        cat = torch.cat
        return CRPNOutputs(anchors, cat(refined, 1), refine_deltas, cat(objectness, 1), cat(deltas, 1))

    def proposals(self, out: CRPNOutputs, image_hw: tuple[int, int], cfg: ProposalConfig | None = None) -> tuple:
        """Stage 1's boxes decoded against the refined anchors: per level top-k, NMS per level, keep."""
        refined = list(out.refined.split([a.shape[0] for a in out.anchors], 1))
        cfg = cfg or self.cfg.proposal
        boxes, scores, _ = propose(out.objectness, out.deltas, refined, image_hw, cfg, STAGE1_STDS)
        boxes, scores = self.selected(boxes, scores, cfg.iou_threshold)
        return boxes, scores, scores >= 0
