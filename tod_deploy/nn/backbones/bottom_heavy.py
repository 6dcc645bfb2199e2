"""The six backbones of the bottom-heavy paper's Table 4, each returning 4 maps at strides 4/8/16/32.

BH-ResNet50 (public code: freshn/Anti-aliasing-Tiny-Object-Detection): 3x3 stride-1 stem conv,
3x3 stride-2 max-pool, bottleneck stages of (7, 6, 2, 1) blocks with the usual widths
(64/128/256/512, x4 out) and a stride-2 first block in *every* stage, so the outputs sit at the
same strides as ResNet50's while most convolutions run at high resolution.

BH-HRNet is not public; the reading built here (the table, taken literally) is:
stem 3x3/1 conv + 3x3/2 conv + 3x3/2 max-pool (stride 4, as HRNet's stem), layer1 unchanged
(4 bottlenecks, the table shows it for neither HRNet), the table's "Stage 1" and "Stage 2" as two
2-branch HR modules of 4 blocks (kept as ``stage2`` with 2 modules, so the mmdet key layout holds),
"Stage 3" as 3-branch modules of 4 blocks (W32: x8 = 2 modules, W18: x12 = 3 modules) and
"Stage 4" as one/two 4-branch modules (W32: x3 = 1 module of 3 blocks, W18: x6 = 2 modules of 3).
Every branch of a module has the deepest branch's block count (the table shows only that one).
This reading does NOT reach Table 4's BH-HRNet figures (BH-HRNet18: 5.92M / 20.52G, +1.1% /
-5.2%; BH-HRNet32: 10.60M / 32.88G, -14% / -37%): the table shows only the deepest branch, and
the missing multiply-adds must sit in the high-resolution branches it does not show.
"""

from __future__ import annotations

from torch import Tensor, nn

from tod_deploy.nn.backbones.hrnet import Bottleneck, HRNet, StageConfig, hrnet_stages, make_layer
from tod_deploy.nn.backbones.resnet_mmdet import STAGE_CHANNELS, ResNet50

# Table 4 (backbone only, 640x512, "GFLOPs" = multiply-adds): name -> (M params, G multiply-adds).
TABLE4: dict[str, tuple[float, float]] = {
    "resnet50": (23.23, 26.91),
    "bh_resnet50": (10.91, 27.12),
    "hrnet32": (29.31, 51.93),
    "bh_hrnet32": (12.36, 51.89),
    "hrnet18": (9.56, 21.71),
    "bh_hrnet18": (5.85, 21.66),
}


class BHResNet50(nn.Module):
    """BH-ResNet50 with torchvision/mmdet key names (``conv1``, ``bn1``, ``layer1.0`` .. ``layer1.6``, ..)."""

    def __init__(self, depths: tuple[int, int, int, int] = (7, 6, 2, 1)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), depths, strict=True), start=1):
            setattr(self, f"layer{index}", make_layer(Bottleneck, cin, planes, blocks, stride=2))
            cin = planes * Bottleneck.expansion
        self.out_channels: tuple[int, ...] = STAGE_CHANNELS

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            outs.append(x)
        return outs


class StandardResNet50(ResNet50):
    """mmdet's ResNet-50 (torchvision body), with ``out_channels`` like the other backbones."""

    out_channels: tuple[int, ...] = STAGE_CHANNELS


def bh_hrnet_stages(width: int) -> list[StageConfig]:
    """The BH-HRNet reading above: stage2 2 x 4 blocks, stage3 / stage4 from Table 4's deepest branch."""
    stage3, stage4 = {32: ((2, 4), (1, 3)), 18: ((3, 4), (2, 3))}[width]
    chans = [tuple(width * 2**b for b in range(n)) for n in (2, 3, 4)]
    return [
        StageConfig(2, (4, 4), chans[0]),
        StageConfig(stage3[0], (stage3[1],) * 3, chans[1]),
        StageConfig(stage4[0], (stage4[1],) * 4, chans[2]),
    ]


def build_backbone(name: str) -> nn.Module:
    """One of ``TABLE4``'s names -> a module returning [C2, C3, C4, C5] with ``out_channels``."""
    if name == "resnet50":
        return StandardResNet50()
    if name == "bh_resnet50":
        return BHResNet50()
    if name in ("hrnet32", "hrnet18"):
        return HRNet(hrnet_stages(int(name[-2:])))
    if name in ("bh_hrnet32", "bh_hrnet18"):
        return HRNet(bh_hrnet_stages(int(name[-2:])), bottom_heavy_stem=True)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(TABLE4)}")
