"""The multiply-add counter against hand counts, and ThumbDet against the paper's Table 2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tod_deploy.complexity import count_complexity
from tod_deploy.inspection import inspect_method
from tod_deploy.methods.base import DeployModel


class Toy(DeployModel):
    raw_names = ("y",)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.conv(images)  # [1, 8, H/2, W/2]
        grid = torch.zeros(1, 7, 11, 2)
        sampled = nn.functional.grid_sample(x, grid, align_corners=False)  # [1, 8, 7, 11]
        return {"y": self.fc(sampled.mean(dim=(2, 3)))}

    def complexity_parts(self) -> dict[str, str]:
        return {"conv": "conv", "fc": "fc"}


def test_counter_matches_hand_count() -> None:
    c = count_complexity(Toy(), (32, 48), Toy().complexity_parts())
    conv = 8 * 16 * 24 * 3 * 3 * 3  # out elements x (k*k*c_in)
    fc = 8 * 5
    grid = 4 * 8 * 7 * 11  # 4 bilinear taps per sampled value
    assert c.parts["conv"]["macs"] == conv and c.parts["fc"]["macs"] == fc
    assert c.macs == conv + fc + grid
    assert c.parameters == 8 * 27 + 8 + 8 * 5 + 5


@pytest.mark.parametrize(("variant", "paper_gmacs"), [("4x", 13.36), ("2x", 45.72), ("1x", 172.9)])
def test_thumbdet_matches_paper_at_coco_size(variant: str, paper_gmacs: float) -> None:
    result = inspect_method("thumbdet", variant, {"input_size": "800x1066"}, None, log=lambda _l: None)
    assert abs(result["gmacs"] / paper_gmacs - 1) < 0.10, result["gmacs"]
    assert abs(result["parameters"] / 40e6 - 1) < 0.10


def test_thumbnail_saves_the_papers_ratio() -> None:
    # Multiply-adds scale with pixels: the 4x thumbnail costs about 1/13 of the full-size model.
    small = inspect_method("thumbdet", "4x", {}, None, log=lambda _l: None)["gmacs"]
    full = inspect_method("thumbdet", "1x", {}, None, log=lambda _l: None)["gmacs"]
    assert 11.5 < full / small < 14.5  # paper: 12.94x


def test_deform_conv_counts_its_conv_and_its_sampling() -> None:
    """torchvision's deform_conv2d is invisible to the stock counter; CFINet's RPN runs one per level."""
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.ops import DeformConv2d

    from tod_deploy.complexity import CUSTOM_FORMULAS

    conv = DeformConv2d(8, 16, 3, padding=1, bias=False)
    x, offsets = torch.rand(2, 8, 10, 12), torch.rand(2, 18, 10, 12)
    plain = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    with FlopCounterMode(display=False) as reference:
        plain(x)
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS) as counted:
        conv(x, offsets)
    sampling = 2 * 4 * (2 * 10 * 12) * 8 * 9  # 4 bilinear taps per sampled input value
    assert counted.get_total_flops() == reference.get_total_flops() + sampling
