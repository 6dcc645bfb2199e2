"""RoIExtractor: each level pools only its own RoIs, eagerly and in the export, as mmdet's extractor does."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torchvision.ops import roi_align

from tod_deploy.export.pipeline import ExportResult
from tod_deploy.nn.heads.roi import RoIExtractor
from tod_deploy.nn.heads.roi_align import roi_align_mmdet


def rois_on_every_level(seed: int, count: int = 200, images: int = 2) -> torch.Tensor:
    """RoIs off the map, past its border and of every scale, so that all four levels are in play."""
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=generator) * 520 - 10
    wh = torch.rand(count, 2, generator=generator) ** 3 * 600
    index = torch.randint(0, images, (count, 1), generator=generator).float()
    return torch.cat([index, xy, xy + wh], 1)


def upstream_extractor(feats: list[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """mmdet's SingleRoIExtractor.forward, written out: zeros, then each level's RoIs pooled with
    torchvision's RoIAlign (mmdet's ``aligned=True``, ``sampling_ratio=0``) into their rows."""
    out = rois.new_zeros(rois.shape[0], feats[0].shape[1], 7, 7)
    for level, stride in enumerate((4, 8, 16, 32)):
        mine = levels == level
        if mine.any():
            out[mine] = roi_align(feats[level], rois[mine], 7, 1.0 / stride, sampling_ratio=0, aligned=True)
    return out


def test_extractor_pools_as_upstream_with_its_gradient() -> None:
    """Values bit for bit as mmdet's loop over levels computes them; gradients (two matrix products
    against torchvision's scatter) to float32 rounding."""
    generator = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 8, 512 // s, 512 // s, generator=generator, requires_grad=True) for s in (4, 8, 16, 32)]
    rois = rois_on_every_level(3)
    extractor = RoIExtractor()
    levels = extractor.target_levels(rois)
    assert levels.unique().numel() == 4  # every level in play
    outputs = []
    for form in (lambda: extractor(feats, rois), lambda: upstream_extractor(feats, rois, levels)):
        pooled = form()
        outputs.append((pooled, torch.autograd.grad((pooled**2).sum(), feats)))
    (ours, our_grads), (upstream, upstream_grads) = outputs
    assert torch.equal(ours, upstream) and ours.abs().sum() > 0
    for got, expected in zip(our_grads, upstream_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_export_pools_each_level_on_its_own_rois(sr_tod_small: ExportResult) -> None:
    """The exported extractor gathers each level's RoIs (NonZero) and scatters the pooled maps back in
    one ScatterND: no RoI pooled on a level it does not belong to, and none of the old form's masks."""
    ops = Counter(node.op_type for node in onnx.load(str(sr_tod_small.onnx_path)).graph.node)
    assert ops["RoiAlign"] == 4 and ops["NonZero"] == 4 and ops["ScatterND"] == 1, ops


def test_exported_extractor_runs_in_onnxruntime_as_upstream(tmp_path) -> None:  # noqa: ANN001
    """The extractor alone through the dynamo exporter and onnxruntime: bit for bit against mmdet's loop,
    with every level in play, with every RoI on one level (three levels empty) and on a second batch size."""

    class Extract(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.extractor = RoIExtractor()

        def forward(self, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor,
                    rois: torch.Tensor) -> torch.Tensor:  # fmt: skip
            return self.extractor([f0, f1, f2, f3], rois)

    generator = torch.Generator().manual_seed(5)
    feats = [torch.randn(2, 8, 512 // s, 512 // s, generator=generator) for s in (4, 8, 16, 32)]
    rois = rois_on_every_level(5)
    with torch.no_grad():
        program = torch.onnx.export(Extract().eval(), (*feats, rois), dynamo=True, opset_version=17, verbose=False,
                                    dynamic_shapes=({}, {}, {}, {}, {0: torch.export.Dim("rois", min=1)}))  # fmt: skip
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    small = rois.clone()
    small[:, 3:] = small[:, 1:3] + 20  # all on level 0
    for boxes in (rois, small, rois[:37]):
        levels = RoIExtractor().target_levels(boxes)
        expected = upstream_extractor(feats, boxes, levels).numpy()
        feed = dict(zip([i.name for i in session.get_inputs()], [t.numpy() for t in (*feats, boxes)], strict=True))
        (got,) = session.run(None, feed)
        np.testing.assert_array_equal(got, expected)


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
