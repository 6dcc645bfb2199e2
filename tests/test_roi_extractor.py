"""RoIExtractor's two forms: the static one exported to ONNX, the per-level one run eagerly."""

from __future__ import annotations

from collections import Counter

import onnx
import torch

from tod_deploy.export.pipeline import ExportResult
from tod_deploy.nn.heads.roi import RoIExtractor


def test_eager_form_pools_bit_for_bit_as_the_exported_form() -> None:
    """Each level pooling its own RoIs (eager: training, verification's reference) against every level
    pooling every RoI and masking (export): values and gradients the same, bit for bit."""
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
        assert torch.equal(got, expected)
    assert torch.equal(extractor(feats, rois), by_level)  # run eagerly: the per-level form


def test_export_writes_the_static_form(sr_tod_small: ExportResult) -> None:
    """Traced for export, the extractor takes the static form: one RoiAlign per level and no
    data-dependent shapes (NonZero), which TensorRT would have to run as dynamic-shape layers."""
    ops = Counter(node.op_type for node in onnx.load(str(sr_tod_small.onnx_path)).graph.node)
    assert ops["RoiAlign"] == 4 and ops["NonZero"] == 0, ops
