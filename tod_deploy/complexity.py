"""Parameters and multiply-adds of a deploy model at a given input size (``inspect``).

Counting is torch's own ``FlopCounterMode`` (convolutions, linear layers, matmuls, attention),
with formulas added for what the stock counter ignores: ``grid_sampler_2d`` (the core of
deformable attention), 4 multiply-adds per sampled value (bilinear), and torchvision's
``deform_conv2d`` (CFINet's RPN), its convolution plus the bilinear sampling of every tap's
input. Multiply-adds are FLOPs / 2,
the unit the papers call "GFLOPs". Element-wise ops are not counted, as fvcore does not count
them either, so the figures compare with the papers'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
import torchvision  # noqa: F401 - registers torch.ops.torchvision.deform_conv2d
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tod_deploy.methods.base import DeployModel
from tod_deploy.nn.binary import BinaryConv2d


def _grid_sample_flops(input_shape: Any, grid_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * 4 * prod(out_shape)  # 4 bilinear taps, each one multiply-add


def _deform_conv_flops(input_shape: Any, weight_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    _, cin_per_group, kh, kw = weight_shape
    outputs = prod(out_shape)  # N * Cout * OH * OW
    sampled = out_shape[0] * out_shape[2] * out_shape[3] * input_shape[1] * kh * kw
    return 2 * (outputs * cin_per_group * kh * kw + 4 * sampled)


CUSTOM_FORMULAS = {
    torch.ops.aten.grid_sampler_2d: _grid_sample_flops,
    torch.ops.torchvision.deform_conv2d: _deform_conv_flops,
}


class _Run(nn.Module):
    """Calls ``run`` through ``__call__`` so the counter's module tracker names every submodule."""

    def __init__(self, model: DeployModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.run(images)


@dataclass
class Complexity:
    """Counts, plus the 1-bit figures in BiDet's convention (the one DFR-Det's Table 2 uses):
    size = 32 bits per real parameter + 1 bit per binary weight; OPs = real multiply-adds +
    binary multiply-adds / 64."""

    input_size: tuple[int, int]
    parameters: int
    macs: int
    parts: dict[str, dict[str, int]] = field(default_factory=dict)
    binary_parameters: int = 0
    binary_macs: int = 0

    @property
    def size_mb(self) -> float:
        return (32 * (self.parameters - self.binary_parameters) + self.binary_parameters) / 8 / 1e6

    @property
    def gops(self) -> float:
        return (self.macs - self.binary_macs + self.binary_macs / 64) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "parameters": self.parameters,
            "macs": self.macs,
            "gmacs": self.macs / 1e9,
            "binary_parameters": self.binary_parameters,
            "binary_macs": self.binary_macs,
            "size_mb": self.size_mb,
            "gops": self.gops,
            "parts": self.parts,
        }


def count_complexity(model: DeployModel, input_size: tuple[int, int], parts: dict[str, str]) -> Complexity:
    """Count on one image; ``parts`` maps a display name to a submodule path for the breakdown."""
    h, w = input_size
    images = torch.zeros(1, 3, h, w)
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=CUSTOM_FORMULAS)
    with torch.no_grad(), counter:
        _Run(model)(images)
    counts = counter.get_flop_counts()
    root = "_Run.model"
    breakdown = {}
    for label, path in parts.items():
        module = model.get_submodule(path)
        prefix = f"{root}.{path}"
        # Containers that are iterated rather than called (ModuleList) have no entry of their
        # own: add up their outermost called descendants instead.
        inside = {k for k in counts if k == prefix or k.startswith(prefix + ".")}
        outermost = [k for k in inside if not any(k.startswith(other + ".") for other in inside)]
        breakdown[label] = {
            "parameters": sum(p.numel() for p in module.parameters()),
            "macs": sum(sum(counts[k].values()) for k in outermost) // 2,
        }
    binary = {name: m for name, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    return Complexity(
        input_size,
        sum(p.numel() for p in model.parameters()),
        counter.get_total_flops() // 2,
        breakdown,
        binary_parameters=sum(m.weight.numel() for m in binary.values()),
        binary_macs=sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in binary) // 2,
    )
