"""HRNet as mmdet builds it (``mmdet/models/backbones/hrnet.py``), with its key names.

Keys: ``conv1``/``bn1``/``conv2``/``bn2`` (stem), ``layer1.i.*`` (bottlenecks), ``transition1.*``,
``stage2.m.branches.b.i.*`` and ``stage2.m.fuse_layers.i.j.*``, ... ``stage4.*``, so mmdet / HRNet
checkpoints load without renaming. All branches of the last module are returned (strides 4, 8,
16, 32; channels W, 2W, 4W, 8W), which is what an FPN needs.

The structure is configurable (stem, stage-1 block, modules and blocks per stage) so the same
code builds the bottom-heavy variants of ``bottom_heavy.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """mmdet BasicBlock: conv1/bn1, conv2/bn2, optional downsample (conv, bn)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """mmdet Bottleneck, style "pytorch" (the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _bn(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_layer(block: type[BasicBlock] | type[Bottleneck], cin: int, planes: int, blocks: int, stride: int = 1):
    """A run of blocks; the first one changes width/stride through a 1x1 conv + BN shortcut."""
    downsample = None
    if stride != 1 or cin != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False), _bn(planes * block.expansion)
        )
    layers = [block(cin, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    """Parallel branches of blocks, then every output resolution sums every branch (fuse_layers):
    higher-resolution inputs go down by chains of 3x3 stride-2 convs, lower ones come up by a 1x1
    conv and nearest up-sampling."""

    def __init__(
        self, block: type[BasicBlock] | type[Bottleneck], num_blocks: tuple[int, ...], channels: tuple[int, ...],
        multiscale_output: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_branches = len(channels)
        self.multiscale_output = multiscale_output
        self.branches = nn.ModuleList(
            make_layer(block, c * block.expansion, c, n) for c, n in zip(channels, num_blocks, strict=True)
        )
        out = [c * block.expansion for c in channels]
        self.fuse_layers = self._fuse(out) if self.num_branches > 1 else None
        self.relu = nn.ReLU(inplace=False)

    def _fuse(self, ch: list[int]) -> nn.ModuleList:
        n = len(ch)
        rows = nn.ModuleList()
        for i in range(n if self.multiscale_output else 1):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(
                        nn.Sequential(
                            nn.Conv2d(ch[j], ch[i], 1, bias=False), _bn(ch[i]),
                            nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                        )
                    )  # fmt: skip
                elif j == i:
                    row.append(None)
                else:
                    steps = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = ch[i] if last else ch[j]
                        parts: list[nn.Module] = [nn.Conv2d(ch[j], cout, 3, 2, 1, bias=False), _bn(cout)]
                        if not last:
                            parts.append(nn.ReLU(inplace=False))
                        steps.append(nn.Sequential(*parts))
                    row.append(nn.Sequential(*steps))
            rows.append(row)
        return rows

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        x = [branch(xi) for branch, xi in zip(self.branches, x, strict=True)]
        if self.fuse_layers is None:
            return x
        fused = []
        for i, row in enumerate(self.fuse_layers):
            y = x[0] if i == 0 else row[0](x[0])
            for j in range(1, self.num_branches):
                y = y + (x[j] if i == j else row[j](x[j]))
            fused.append(self.relu(y))
        return fused


@dataclass(frozen=True)
class StageConfig:
    """One HRNet stage: ``num_modules`` HRModules of ``num_blocks[b]`` blocks on branch ``b``."""

    num_modules: int
    num_blocks: tuple[int, ...]
    channels: tuple[int, ...]
    block: str = "basic"


def hrnet_stages(width: int, modules: tuple[int, int, int] = (1, 4, 3), blocks: int = 4) -> list[StageConfig]:
    """Stages 2..4 of HRNet-W``width`` (mmdet's hrnetv2p_w{18,32,40} configs use (1, 4, 3) x 4)."""
    chans = [tuple(width * 2**b for b in range(n)) for n in (2, 3, 4)]
    return [StageConfig(m, (blocks,) * len(c), c) for m, c in zip(modules, chans, strict=True)]


class HRNet(nn.Module):
    """HRNet backbone. ``bottom_heavy_stem``: 3x3/1 conv, 3x3/2 conv, 3x3/2 max-pool (the paper's
    BH stem) instead of two 3x3/2 convs; ``stage1`` is layer1 (``(block, planes, blocks)``)."""

    def __init__(
        self, stages: list[StageConfig], stage1: tuple[str, int, int] = ("bottleneck", 64, 4),
        bottom_heavy_stem: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.bottom_heavy_stem = bottom_heavy_stem
        self.conv1 = nn.Conv2d(3, 64, 3, 1 if bottom_heavy_stem else 2, 1, bias=False)
        self.bn1 = _bn(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = _bn(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if bottom_heavy_stem else None
        block = BLOCKS[stage1[0]]
        self.layer1 = make_layer(block, 64, stage1[1], stage1[2])
        prev = [stage1[1] * block.expansion]
        for index, cfg in enumerate(stages, start=2):
            blk = BLOCKS[cfg.block]
            cur = [c * blk.expansion for c in cfg.channels]
            setattr(self, f"transition{index - 1}", self._transition(prev, cur))
            modules = [HRModule(blk, cfg.num_blocks, cfg.channels) for _ in range(cfg.num_modules)]
            setattr(self, f"stage{index}", nn.Sequential(*modules))
            prev = cur
        self.num_stages = len(stages)
        self.out_channels: tuple[int, ...] = tuple(prev)

    @staticmethod
    def _transition(prev: list[int], cur: list[int]) -> nn.ModuleList:
        layers = nn.ModuleList()
        for i, c in enumerate(cur):
            if i < len(prev):
                if prev[i] != c:
                    layers.append(
                        nn.Sequential(nn.Conv2d(prev[i], c, 3, 1, 1, bias=False), _bn(c), nn.ReLU(inplace=True))
                    )
                else:
                    layers.append(None)
            else:
                steps = []
                for k in range(i + 1 - len(prev)):
                    cout = c if k == i - len(prev) else prev[-1]
                    steps.append(
                        nn.Sequential(nn.Conv2d(prev[-1], cout, 3, 2, 1, bias=False), _bn(cout), nn.ReLU(inplace=True))
                    )
                layers.append(nn.Sequential(*steps))
        return layers

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        ys = [self.layer1(x)]
        for index in range(2, self.num_stages + 2):
            transition = getattr(self, f"transition{index - 1}")
            xs = []
            for i, t in enumerate(transition):
                if t is None:
                    xs.append(ys[i])
                else:  # existing branches change width in place; new ones grow from the lowest resolution
                    xs.append(t(ys[i] if i < len(ys) else ys[-1]))
            ys = getattr(self, f"stage{index}")(xs)
        return ys
