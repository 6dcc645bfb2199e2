"""ResNet-18 in two forms: real-valued, and 1-bit Bi-Real style (DFR-Det, BiDet).

1-bit form (paper section 4.1): every 3x3 conv of the residual stages is a ``BinaryConv2d``
with its own shortcut around it (Bi-Real Net's extra shortcut) and a PReLU after the sum; the
stem (first layer) and the downsample shortcuts (AvgPool 2x2 + real 1x1 conv + BN) stay real.
Key names mirror torchvision's BasicBlock (``layer1.0.conv1.weight``, ``bn1``, ``downsample``)
plus ``prelu1``/``prelu2``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from tod_deploy.nn.binary import BinaryConv2d

STAGE_CHANNELS = (64, 128, 256, 512)
ConvFactory = Callable[[int, int, int], nn.Module]  # (cin, cout, stride) -> 3x3 conv


def real_conv3x3(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def binary_conv3x3(options: dict[str, object]) -> ConvFactory:
    def make(cin: int, cout: int, stride: int) -> nn.Module:
        return BinaryConv2d(cin, cout, 3, stride=stride, padding=1, **options)

    return make


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, conv: ConvFactory, bireal: bool) -> None:
        super().__init__()
        self.bireal = bireal
        self.conv1, self.bn1 = conv(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout, 1), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            # Bi-Real/ReActNet downsample: average-pool then a real 1x1 conv (torchvision: strided 1x1).
            layers = [nn.AvgPool2d(2, 2)] if bireal and stride != 1 else []
            layers += [nn.Conv2d(cin, cout, 1, stride=1 if bireal else stride, bias=False), nn.BatchNorm2d(cout)]
            self.downsample = nn.Sequential(*layers)
        act = (lambda: nn.PReLU(cout)) if bireal else (lambda: nn.ReLU(inplace=True))
        self.prelu1, self.prelu2 = act(), act()

    def forward(self, x: Tensor) -> Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        if self.bireal:  # a shortcut around each binary conv
            out = self.prelu1(self.bn1(self.conv1(x)) + identity)
            return self.prelu2(self.bn2(self.conv2(out)) + out)
        out = self.prelu1(self.bn1(self.conv1(x)))
        return self.prelu2(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """C2..C5 (strides 4..32). ``conv`` picks real or binary 3x3 convs; ``bireal`` the block form."""

    def __init__(self, conv: ConvFactory = real_conv3x3, bireal: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, cout in enumerate(STAGE_CHANNELS, start=1):
            stride = 1 if i == 1 else 2
            blocks = [BasicBlock(cin, cout, stride, conv, bireal), BasicBlock(cout, cout, 1, conv, bireal)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs
