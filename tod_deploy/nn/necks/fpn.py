"""mmdet's FPN with its key names (``neck.lateral_convs.i.conv.*``, ``neck.fpn_convs.i.conv.*``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ConvModule(nn.Module):
    """mmcv's ConvModule without norm/activation: the ``.conv`` level in the key names."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """Top-down FPN. Extra levels: ``"pool"`` (max-pool of the top output, Faster R-CNN),
    ``"on_input"`` (3x3/2 convs on the last backbone map, then on ReLU of the previous, RetinaNet)
    or ``"on_output"`` (the same, starting from the top output, FCOS)."""

    def __init__(
        self, in_channels: list[int], out_channels: int, num_outs: int, start_level: int = 0, extra: str = "pool"
    ) -> None:
        super().__init__()
        self.start_level, self.num_outs, self.extra = start_level, num_outs, extra
        used = in_channels[start_level:]
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in used)
        fpn = [ConvModule(out_channels, out_channels, 3, padding=1) for _ in used]
        if extra in ("on_input", "on_output"):
            for i in range(num_outs - len(used)):
                first_in = in_channels[-1] if extra == "on_input" else out_channels
                fpn.append(ConvModule(first_in if i == 0 else out_channels, out_channels, 3, 2, 1))
        self.fpn_convs = nn.ModuleList(fpn)
        self.in_channels = in_channels

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        feats = feats[self.start_level :]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
            )
        outs = [self.fpn_convs[i](lat) for i, lat in enumerate(laterals)]
        n_used = len(laterals)
        if self.extra == "pool":
            while len(outs) < self.num_outs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        else:
            outs.append(self.fpn_convs[n_used](feats[-1] if self.extra == "on_input" else outs[-1]))
            for i in range(n_used + 1, self.num_outs):
                outs.append(self.fpn_convs[i](F.relu(outs[-1])))
        return outs
