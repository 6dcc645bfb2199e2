"""SSPNet's SSFPN neck, as the public bottom-heavy TinyPerson model uses it (``neck.*`` keys 1:1).

Upstream: freshn/Anti-aliasing-Tiny-Object-Detection, ``TinyPerson/mmdet/models/necks/ssfpn.py``
(from SSPNet). An FPN whose laterals are steered by a context-attention module (``CAM``):

- CAM: the four laterals, nearest-resized to the finest one and concatenated (4 x 256 channels),
  go through ``dila_conv`` = 3x3 conv (1024 -> 256), an ASPP (1x1, 3x3 dilation 2, 3x3 dilation 5
  and a 1x1 on the global average, 64 channels each, ReLU, concatenated), 3x3 conv, BN, ReLU. A
  chain of ``down_conv`` 3x3 convs (stride 1, then 2, 2, 2) walks that map down the pyramid and
  ``att_conv`` (3x3, 1 channel) + sigmoid gives one attention map per level.
- Laterals are re-weighted by (1 + att_i); the top-down path adds the upsampled coarser lateral
  gated by att_i * upsampled att_{i+1}; each output is (1 + att_i) * fpn_conv_i(lateral_i).
- P6 is a 1x1 stride-2 max-pool of the top output (no extra convs).

The attention maps are supervised in SSPNet's training (its ``Heatmap`` loss); the neck returns
only the five outputs, which is all inference needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.nn.necks.fpn import ConvModule

ASPP_DILATIONS = (1, 2, 5, 1)  # the last branch is a 1x1 on the global average


def kaiming_conv(cin: int, cout: int, kernel: int, *, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """A biased conv padded to keep size (per stride), initialised as mmcv's ``kaiming_init``."""
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


class ASPP(nn.Module):
    """Keys ``aspp.{0..3}``; the output has 4 x ``out_channels`` channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.aspp = nn.ModuleList(
            kaiming_conv(in_channels, out_channels, 3 if d > 1 else 1, dilation=d) for d in ASPP_DILATIONS
        )

    def forward(self, x: Tensor) -> Tensor:
        *local, pooled = self.aspp
        outs = [F.relu(conv(x)) for conv in local]
        outs.append(F.relu(pooled(F.adaptive_avg_pool2d(x, 1))).expand_as(outs[-1]))
        return torch.cat(outs, dim=1)


class CAM(nn.Module):
    """Context attention: one sigmoid map per pyramid level, at that level's size."""

    def __init__(self, channels: int = 256, levels: int = 4) -> None:
        super().__init__()
        self.dila_conv = nn.Sequential(
            kaiming_conv(channels * levels, channels, 3),
            ASPP(channels, channels // 4),
            kaiming_conv(channels, channels, 3),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        strides = [1] + [2] * (levels - 1)
        self.down_conv = nn.ModuleList(kaiming_conv(channels, channels, 3, stride=s) for s in strides)
        self.att_conv = nn.ModuleList(kaiming_conv(channels, 1, 3) for _ in range(levels))

    def forward(self, laterals: list[Tensor]) -> list[Tensor]:
        size = laterals[0].shape[2:]
        stacked = [laterals[0], *(F.interpolate(x, size=size, mode="nearest") for x in laterals[1:])]
        x = self.dila_conv(torch.cat(stacked, dim=1))
        maps = []
        for down, att in zip(self.down_conv, self.att_conv, strict=True):
            x = down(x)
            maps.append(torch.sigmoid(att(x)))
        return maps


class SSFPN(nn.Module):
    """Keys ``lateral_convs.i.conv``, ``fpn_convs.i.conv`` (i < 4) and ``CAM.*``; P2..P6 out."""

    def __init__(self, in_channels: list[int], out_channels: int = 256, num_outs: int = 5) -> None:
        super().__init__()
        self.num_outs = num_outs
        self.in_channels = in_channels
        self.CAM = CAM(out_channels, len(in_channels))  # upper case: upstream's key name
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats, strict=True)]
        att = self.CAM(laterals)
        laterals = [(1 + a) * lat for a, lat in zip(att, laterals, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            size = laterals[i - 1].shape[2:]
            gate = att[i - 1] * F.interpolate(att[i], size=size, mode="nearest")
            laterals[i - 1] = laterals[i - 1] + gate * F.interpolate(laterals[i], size=size, mode="nearest")
        outs = [(1 + a) * conv(lat) for a, conv, lat in zip(att, self.fpn_convs, laterals, strict=True)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
