"""ResNet-50 as mmdet builds it: keys ``conv1.weight``, ``layer1.0.conv1.weight``, ... at the
backbone's top level (``backbone.conv1.weight`` in a detector), C2..C5 outputs."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models._utils import IntermediateLayerGetter

STAGE_CHANNELS = (256, 512, 1024, 2048)


class ResNet50(IntermediateLayerGetter):
    """mmdet ResNet-50 (style pytorch, norm_eval, frozen stem + layer1 in training)."""

    def __init__(self) -> None:
        super().__init__(resnet50(weights=None), {f"layer{i}": str(i - 1) for i in range(1, 5)})

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return list(super().forward(x).values())

    def train(self, mode: bool = True) -> ResNet50:
        # norm_eval=True: BN statistics stay frozen even while the detector trains.
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def freeze_stem(self) -> None:
        for name, p in self.named_parameters():
            if name.startswith(("conv1", "bn1", "layer1")):
                p.requires_grad_(False)
