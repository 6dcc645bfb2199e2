"""ResNet bodies with torchvision/mmdet key names, and BN folding for deployment.

The body is torchvision's ResNet behind an ``IntermediateLayerGetter``, so state-dict keys are
``conv1.weight``, ``layer1.0.conv1.weight``, ... exactly as Deformable-DETR and mmdet store
them, and released checkpoints load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from tod_deploy.nn.binary import BinaryConv2d

RESNET50_CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}


def resnet50_body(return_layers: tuple[str, ...] = ("layer2", "layer3", "layer4")) -> nn.Module:
    """ResNet-50 with frozen BN returning the named stages (ordered dict "0", "1", ...)."""
    net = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return IntermediateLayerGetter(net, {name: str(i) for i, name in enumerate(return_layers)})


def _folded(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        base = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((base - bn.running_mean) * scale + bn.bias)
    return fused


def _fold_into_binary(conv: BinaryConv2d, bn: nn.Module) -> None:
    """alpha * S + b, then BN, is alpha' * S + b' with alpha' = alpha * s, b' = (b - mean) * s + beta:
    the 1-bit kernel's epilogue applies both, so the BN pass disappears."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    base = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        conv.alpha = nn.Parameter(conv.scale().detach() * scale)
        conv.alpha_mode = "learned"
        conv.bias = nn.Parameter((base - bn.running_mean) * scale + bn.bias)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every Conv2d (real or 1-bit) directly followed by a BatchNorm/FrozenBN sibling, in place.

    Why: at inference BN is an affine per channel; folding it saves a pass over every feature
    map in eager PyTorch and gives the exporter fewer nodes. Returns how many were folded.
    """
    folded = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for conv_name, bn_name in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if not isinstance(bn, FrozenBatchNorm2d | nn.BatchNorm2d):
                continue
            if isinstance(conv, BinaryConv2d):
                _fold_into_binary(conv, bn)
            elif isinstance(conv, nn.Conv2d):
                parent._modules[conv_name] = _folded(conv, bn)
            else:
                continue
            parent._modules[bn_name] = nn.Identity()
            folded += 1
    return folded
