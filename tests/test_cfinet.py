"""CFINet: key layout, anchor-derived DeformConv offsets, area-based mining, FI-free deploy graph,
checkpoints, one training step with the Feature Imitation loss, export parity."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torchvision.ops import box_iou, deform_conv2d

from tod_deploy.errors import UserError
from tod_deploy.export.pipeline import ExportResult
from tod_deploy.models import build_deploy_model, build_training_model, parameter_count
from tod_deploy.nn.heads.crpn import anchor_offsets
from tod_deploy.nn.heads.crpn_loss import assign_by_area, positive_iou_thresholds
from tod_deploy.recipes import load_recipe

SMALL = {"input_size": "256x256", "top_k": 100}
FI_SHAPES = {(512, 256), (512, 512), (128, 512)}  # fc_enc.0, fc_enc.1, fc_proj weights


def quiet(_line: str) -> None:
    pass


def recipe(**model: object):
    return load_recipe("cfinet", overrides={**SMALL, "model": dict(model)})


def test_recipe_follows_the_public_config() -> None:
    r = load_recipe("cfinet")
    assert r.input_size == (1216, 1216) and r.opset >= 19  # 1200 padded to /32; DeformConv needs opset 19
    assert r.model["num_classes"] == 9 and r.top_k == 100 and r.score_threshold == 0.05
    assert (r.model["rpn_nms_pre"], r.model["rpn_max_per_img"], r.model["rpn_iou"]) == (1000, 300, 0.5)


def test_upstream_key_names() -> None:
    model, _ = build_training_model(recipe(), None, log=quiet)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "rpn_head.stages.0.rpn_conv.conv.weight": (256, 256, 3, 3), "rpn_head.stages.0.rpn_conv.conv.bias": (256,),
        "rpn_head.stages.0.rpn_reg.weight": (4, 256, 1, 1), "rpn_head.stages.1.rpn_conv.conv.weight": (256, 256, 3, 3),
        "rpn_head.stages.1.rpn_cls.weight": (1, 256, 1, 1), "rpn_head.stages.1.rpn_reg.bias": (4,),
        "roi_head.comp_convs.2.conv.weight": (256, 256, 3, 3), "roi_head.comp_convs.0.gn.weight": (256,),
        "roi_head.comp_convs.1.gn.bias": (256,), "roi_head.bbox_head.fc_cls.weight": (10, 1024),
        "roi_head.bbox_head.fc_reg.weight": (36, 1024), "roi_head.fc_enc.0.weight": (512, 256),
        "roi_head.fc_enc.1.weight": (512, 512), "roi_head.fc_proj.weight": (128, 512),
        "neck.fpn_convs.3.conv.weight": (256, 256, 3, 3), "backbone.layer4.2.conv3.weight": (2048, 512, 1, 1),
    }  # fmt: skip
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    absent = [
        "rpn_head.stages.0.rpn_cls.weight", "rpn_head.stages.1.rpn_conv.conv.bias", "roi_head.comp_convs.0.conv.bias",
        "roi_head.comp_convs.3.conv.weight", "neck.fpn_convs.4.conv.weight",
    ]  # fmt: skip
    assert not [k for k in absent if k in shapes]
    conv0 = model.rpn_head.stages[0].rpn_conv.conv
    assert conv0.dilation == (3, 3) and conv0.padding == (3, 3)


def sampling_positions(anchors: torch.Tensor, stride: int, hw: tuple[int, int]) -> torch.Tensor:
    """Where each tap lands, straight from the geometry: the anchor centre plus (k - 1) half-extents."""
    x1, y1, x2, y2 = (anchors[0, :, i] / stride for i in range(4))
    k = torch.tensor([-1.0, 0.0, 1.0])
    ys = ((y1 + y2) / 2)[:, None, None] + ((y2 - y1) / 2)[:, None, None] * k[None, :, None]
    xs = ((x1 + x2) / 2)[:, None, None] + ((x2 - x1) / 2)[:, None, None] * k[None, None, :]
    return torch.stack([ys.expand(-1, 3, 3), xs.expand(-1, 3, 3)], dim=-1).reshape(hw[0] * hw[1], 9, 2)


def test_offsets_from_anchors_match_a_direct_computation() -> None:
    stride, hw = 8, (5, 7)
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(1, 35, 2, generator=gen) * torch.tensor([56.0, 40.0])
    wh = 4 + torch.rand(1, 35, 2, generator=gen) * 60
    anchors = torch.cat([xy, xy + wh], dim=-1)
    offsets = anchor_offsets(anchors, stride, hw)
    assert offsets.shape == (1, 18, 5, 7)
    # DeformConv tap (ky, kx) at output (y, x) samples (y - 1 + ky + dy, x - 1 + kx + dx), (dy, dx) interleaved
    grid_y, grid_x = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    k = torch.arange(9)
    per_tap = offsets[0].reshape(9, 2, 35)
    got_y = grid_y.reshape(1, 35) - 1 + (k // 3)[:, None] + per_tap[:, 0]
    got_x = grid_x.reshape(1, 35) - 1 + (k % 3)[:, None] + per_tap[:, 1]
    want = sampling_positions(anchors, stride, hw)
    torch.testing.assert_close(torch.stack([got_y.T, got_x.T], -1), want, atol=1e-5, rtol=0)

    # and torchvision's deform_conv2d reads them that way: one tap at a time equals bilinear sampling there
    feat = torch.rand(1, 1, *hw, generator=gen)
    for tap in (0, 4, 8):
        weight = torch.zeros(1, 1, 3, 3)
        weight.view(-1)[tap] = 1.0
        out = deform_conv2d(feat, offsets, weight, padding=(1, 1))
        pos = want[:, tap]  # [35, 2] pixel coordinates (y, x)
        norm = torch.stack([(2 * pos[:, 1] + 1) / hw[1] - 1, (2 * pos[:, 0] + 1) / hw[0] - 1], -1)
        ref = F.grid_sample(feat, norm.view(1, 1, 35, 2), align_corners=False, padding_mode="zeros")
        torch.testing.assert_close(out.reshape(35), ref.reshape(35), atol=1e-5, rtol=0)


def test_area_based_anchor_mining() -> None:
    sides = [4.0, 12.0, 24.0, 48.0, 96.0, 200.0]
    gt = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    want = [min(0.7, max(0.2, 0.25 + 0.15 * math.log2(s / 12))) for s in sides]
    assert positive_iou_thresholds(gt).tolist() == pytest.approx(want, abs=1e-6)
    assert want[0] == 0.2 and want[-1] == 0.7  # clamped at both ends
    # the same overlap (IoU 0.5) makes a positive for a 12 px object but not for a 96 px one
    small, large = torch.tensor([[100.0, 100.0, 112.0, 112.0]]), torch.tensor([[300.0, 300.0, 396.0, 396.0]])
    anchors = torch.tensor([[100.0, 104.0, 112.0, 112.0], [300.0, 332.0, 396.0, 396.0], [0.0, 0.0, 4.0, 4.0]])
    gts = torch.cat([small, large])
    assert box_iou(anchors[:2], gts).diagonal().tolist() == pytest.approx([2 / 3, 2 / 3])
    assigned = assign_by_area(anchors, gts).tolist()
    assert assigned[0] == 0 and assigned[1] < 0 and assigned[2] == -1  # -1: negative (IoU < 0.15)


def test_deploy_graph_has_no_feature_imitation(small_cfinet: ExportResult) -> None:
    deploy, _ = build_deploy_model(recipe(), None, log=quiet)
    assert deploy.net.roi_head.fc_enc is None and deploy.net.roi_head.fc_proj is None
    assert not any("fc_enc" in k or "fc_proj" in k for k in deploy.state_dict())
    model = onnx.load(str(small_cfinet.onnx_path))
    inits = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert not [a.shape for a in inits if tuple(a.shape) in FI_SHAPES]
    float_params = sum(a.size for a in inits if a.dtype == np.float32 and a.size > 1)
    deployed = parameter_count(deploy)
    fi = 256 * 512 + 512 + 512 * 512 + 512 + 512 * 128 + 128
    assert abs(float_params - deployed) < 0.01 * deployed  # the FI branch is 1% of it: it would show
    assert fi > 0.01 * deployed
    ops = {n.op_type for n in model.graph.node}
    assert {"DeformConv", "RoiAlign", "NonMaxSuppression", "TopK"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)


def test_export_parity(small_cfinet: ExportResult) -> None:
    report = small_cfinet.verification
    assert report.ok, report.failure()
    names = {o.name for o in report.outputs}
    assert {"rpn_refine_deltas", "refined_anchors", "rpn_cls_logits", "rpn_bbox_deltas"} <= names
    assert report.detections.checked >= 50 and report.detections.count_diff == 0


def test_checkpoint_training_only_keys_reported(tmp_path: Path) -> None:
    source, _ = build_training_model(recipe(), None, seed=3, log=quiet)
    state = source.state_dict()
    torch.save({"state_dict": state}, tmp_path / "full.pth")
    lines: list[str] = []
    deploy, _ = build_deploy_model(recipe(), tmp_path / "full.pth", log=lines.append)
    assert any("training-only" in line and "roi_head.fc_enc" in line for line in lines), lines
    torch.testing.assert_close(
        deploy.net.rpn_head.stages[1].rpn_conv.conv.weight, state["rpn_head.stages.1.rpn_conv.conv.weight"]
    )
    torch.save(
        {k: v for k, v in state.items() if not k.startswith(("roi_head.fc_enc", "roi_head.fc_proj"))},
        tmp_path / "inference_only.pth",
    )
    lines.clear()
    build_deploy_model(recipe(), tmp_path / "inference_only.pth", log=lines.append)
    assert any("missing 6 training-only" in line for line in lines), lines
    torch.save({k: v for k, v in state.items() if not k.startswith("rpn_head.stages.1")}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"lacks 5 of the .* rpn_head\.stages\.1"):
        build_deploy_model(recipe(), tmp_path / "partial.pth", log=quiet)


def test_one_training_step_with_feature_imitation() -> None:
    torch.manual_seed(0)
    model, _ = build_training_model(recipe(), None, log=quiet)
    # every ground truth counts as a high-quality instance here (random weights score low), so the
    # step also builds augmented views and fills the exemplar queue, as training would later on
    model.imitation = replace(model.imitation, hq_score=0.0, lq_score=0.0, hq_min_proposals=0)
    model.train()
    images = torch.rand(2, 3, 256, 256) * 255
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 18.0, 30.0], [100.0, 100.0, 140.0, 132.0]]),
         "labels": torch.tensor([1, 4])},
        {"boxes": torch.tensor([[50.0, 60.0, 56.0, 64.0]]), "labels": torch.tensor([1])},
    ]  # fmt: skip
    losses = model.training_losses(images, targets)
    assert {"s0.loss_rpn_reg", "s1.loss_rpn_cls", "s1.loss_rpn_reg", "loss_cls", "loss_bbox", "loss_con"} <= set(losses)
    for name, value in losses.items():
        assert torch.isfinite(value), name
    assert losses["loss_con"] > 0 and losses["s0.loss_rpn_reg"] > 0
    sum(losses.values()).backward()
    for name, p in [*model.roi_head.fc_enc.named_parameters(), *model.roi_head.fc_proj.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"Feat2Embed {name}"
    for name in ("rpn_head.stages.0.rpn_conv.conv.weight", "rpn_head.stages.1.rpn_conv.conv.weight",
                 "roi_head.comp_convs.0.conv.weight"):  # fmt: skip
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    queued = {label: model.exemplars.get(label) for label in (1, 4)}
    assert queued[1] is not None and queued[1].shape[1:] == (256, 7, 7) and queued[1].shape[0] == 2
    assert queued[4] is not None and queued[4].shape[0] == 1
    # a second step contrasts against the queued exemplars too
    model.imitation = replace(model.imitation, hq_score=2.0, lq_score=2.0)  # none high-quality: exemplars only
    model.zero_grad()
    again = model.training_losses(images, targets)
    assert torch.isfinite(again["loss_con"]) and again["loss_con"] > 0


def test_stage0_loss_averaged_over_the_anchors_of_a_chosen_input() -> None:
    """By default stage 0 divides by the batch images' own anchors / 200, as mmdet's Cascade RPN; with
    ``stage0_average_hw`` by those of that input, so the term is smaller by exactly the anchor ratio."""
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 255
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 18.0, 30.0], [100.0, 100.0, 140.0, 132.0]]),
                "labels": torch.tensor([1, 4])}]  # fmt: skip
    terms = []
    for model_section in ({}, {"stage0_average_hw": [1216, 1216]}):
        torch.manual_seed(0)
        model, _ = build_training_model(recipe(**model_section), None, log=quiet)
        model.train()
        with torch.no_grad():
            hws = [f.shape[-2:] for f in model.features(images)]
            terms.append(float(model.training_losses(images, targets)["s0.loss_rpn_reg"]))
        anchors = model.stage0_average_anchors((256, 256))
    assert sum(h * w for h, w in hws) == 64 * 64 + 32 * 32 + 16 * 16 + 8 * 8  # the default: the image's own
    assert anchors == 304 * 304 + 152 * 152 + 76 * 76 + 38 * 38  # 1216x1216's four levels
    assert terms[0] > 0 and math.isclose(terms[1], terms[0] * 5440 / anchors, rel_tol=1e-5)
