"""RoIExtractor's two forms: the static one exported to ONNX, the per-level one run eagerly."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torchvision.ops import roi_align

from tod_deploy.export.pipeline import ExportResult
from tod_deploy.nn.heads.roi import RoIExtractor
from tod_deploy.nn.heads.roi_align import roi_align_mmdet


def test_eager_form_pools_bit_for_bit_as_the_exported_form() -> None:
    """Each level pooling its own RoIs (eager: training, verification's reference) against every level
    pooling every RoI and masking (export): values the same bit for bit, gradients (two matrix products
    against torchvision's scatter) to float32 rounding."""
    generator = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 8, 512 // s, 512 // s, generator=generator, requires_grad=True) for s in (4, 8, 16, 32)]
    xy = torch.rand(200, 2, generator=generator) * 520 - 10
    wh = torch.rand(200, 2, generator=generator) ** 3 * 600
    index = torch.randint(0, 2, (200, 1), generator=generator).float()
    rois = torch.cat([index, xy, xy + wh], 1)
    extractor = RoIExtractor()
    levels = extractor.target_levels(rois)
    assert levels.unique().numel() == 4  # every level in play
    outputs = []
    for form in (extractor.pooled_static, extractor.pooled_by_level):
        pooled = form(feats, rois, levels)
        outputs.append((pooled, torch.autograd.grad((pooled**2).sum(), feats)))
    (static, static_grads), (by_level, by_level_grads) = outputs
    assert torch.equal(by_level, static) and by_level.abs().sum() > 0
    for got, expected in zip(by_level_grads, static_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(extractor(feats, rois), by_level)  # run eagerly: the per-level form


def test_export_writes_the_static_form(sr_tod_small: ExportResult) -> None:
    """Traced for export, the extractor takes the static form: one RoiAlign per level and no
    data-dependent shapes (NonZero), which TensorRT would have to run as dynamic-shape layers."""
    ops = Counter(node.op_type for node in onnx.load(str(sr_tod_small.onnx_path)).graph.node)
    assert ops["RoiAlign"] == 4 and ops["NonZero"] == 0, ops


@pytest.mark.parametrize("stride", [4, 16])
def test_roi_align_gradient_is_the_exact_derivative(stride: int) -> None:
    """The separable backward against finite differences of torchvision's forward (RoIAlign is linear
    in the features, so the numerical Jacobian is exact in float64): RoIs off the map, past its border,
    of negative extent, and wider than several sampling grids, on two images."""
    generator = torch.Generator().manual_seed(stride)
    feats = torch.randn(2, 3, 48 // stride * 2, 64 // stride * 2, dtype=torch.float64, generator=generator)
    xy = torch.rand(40, 2, generator=generator, dtype=torch.float64) * 180 - 30
    wh = torch.rand(40, 2, generator=generator, dtype=torch.float64) ** 3 * 160 - 4
    index = torch.randint(0, 2, (40, 1), generator=generator).double()
    rois = torch.cat([index, xy, xy + wh], 1)
    derivative = torch.autograd.gradcheck  # fast_mode: random projections of both Jacobians, many times cheaper
    assert derivative(lambda f: roi_align_mmdet(f, rois, 7, 1.0 / stride), (feats.requires_grad_(),), fast_mode=True)


def test_roi_align_gradient_matches_torchvision_on_one_image() -> None:
    """The one-image path of a training step against torchvision's own backward, float32."""
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 16, 32, 32, generator=generator, requires_grad=True)
    xy = torch.rand(300, 2, generator=generator) * 150 - 10
    rois = torch.cat([torch.zeros(300, 1), xy, xy + torch.rand(300, 2, generator=generator) ** 2 * 120], 1)
    upstream = torch.randn(300, 16, 7, 7, generator=generator)
    expected = torch.autograd.grad(roi_align(feats, rois, 7, 0.25, sampling_ratio=0, aligned=True), feats, upstream)
    got = torch.autograd.grad(roi_align_mmdet(feats, rois, 7, 0.25), feats, upstream)
    assert torch.equal(roi_align_mmdet(feats, rois, 7, 0.25), roi_align(feats, rois, 7, 0.25, 0, True))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5 * float(expected[0].abs().max()))
