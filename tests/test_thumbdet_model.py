"""ThumbDet in PyTorch: down-sampler geometry, key layout, deploy contract, training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tod_deploy.methods.thumbdet import (
    ThumbDetConfig,
    down_sampler,
    moment_matching_loss,
    query_filter,
)
from tod_deploy.models import build_training_model, parameter_count
from tod_deploy.nn.deformable_detr import MSDeformAttn
from tod_deploy.nn.ops import ms_deform_attn
from tod_deploy.recipes import load_recipe


def quiet(_line: str) -> None:
    pass


@pytest.mark.parametrize(
    ("scale", "size", "expected"),
    [
        (4, (800, 1333), (200, 334)),
        (4, (256, 384), (64, 96)),
        (2, (800, 1333), (398, 665)),
        (2, (256, 256), (126, 126)),
    ],
)
def test_down_sampler_output_size(scale: int, size: tuple[int, int], expected: tuple[int, int]) -> None:
    # 4x: two 3x3/2 pad 1 convs -> ceil(ceil(H/2)/2); 2x: 5x5/1 pad 1 then 5x5/2 pad 1 -> floor((H-5)/2)+1
    net = down_sampler(scale)
    out = net(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, *expected)
    assert (out >= 0).all()  # ends in ReLU


def test_down_sampler_structure_matches_paper() -> None:
    net = down_sampler(4)
    assert [tuple(m.weight.shape) for m in net if isinstance(m, torch.nn.Conv2d)] == [(12, 3, 3, 3), (3, 12, 3, 3)]
    assert all(m.bias is None for m in net if isinstance(m, torch.nn.Conv2d))
    net2 = down_sampler(2)
    assert [tuple(m.weight.shape) for m in net2 if isinstance(m, torch.nn.Conv2d)] == [(12, 3, 5, 5), (3, 12, 5, 5)]
    assert down_sampler(1) is None


def test_state_dict_uses_upstream_keys() -> None:
    model, _ = build_training_model(load_recipe("thumbdet"), None, log=quiet)
    keys = set(model.student.state_dict())
    for key in (
        "backbone.0.down_sample.0.weight",
        "backbone.0.down_sample.2.weight",
        "backbone.0.body.conv1.weight",
        "backbone.0.body.layer4.2.bn3.running_var",
        "transformer.level_embed",
        "transformer.reference_points.weight",
        "transformer.encoder.layers.5.self_attn.sampling_offsets.weight",
        "transformer.decoder.layers.5.cross_attn.attention_weights.bias",
        "transformer.decoder.layers.0.self_attn.in_proj_weight",
        "input_proj.3.0.weight",
        "class_embed.5.weight",
        "bbox_embed.0.layers.2.bias",
        "query_embed.weight",
    ):
        assert key in keys, key
    assert all(k.startswith("teacher.") or k.startswith("student.") for k in model.state_dict())


def test_deploy_drops_teacher_and_keeps_student() -> None:
    recipe = load_recipe("thumbdet", overrides={"input_size": "256x384"})
    model, _ = build_training_model(recipe, None, log=quiet)
    deploy = model.deploy(recipe)
    names = [name for name, _ in deploy.named_modules()]
    assert not any("teacher" in name or "criterion" in name for name in names)
    # Folding BN adds one bias per folded channel and drops the frozen BN buffers.
    bn_channels = sum(m.weight.numel() for m in model.student.modules() if type(m).__name__ == "FrozenBatchNorm2d")
    assert parameter_count(deploy) == parameter_count(model.student) + bn_channels
    assert parameter_count(model) > 1.9 * parameter_count(model.student)  # the teacher was really there
    assert not any(p.requires_grad for p in deploy.parameters())
    assert not deploy.training


def test_deploy_contract_shapes_dtypes_and_padding() -> None:
    recipe = load_recipe("thumbdet", overrides={"input_size": "256x384", "top_k": 50})
    model, _ = build_training_model(recipe, None, log=quiet)
    deploy = model.deploy(recipe)
    images = torch.rand(2, 3, 256, 384) * 255
    with torch.no_grad():
        all_scores = deploy(images)[2]
        # A threshold between the 20th and 21st score of the first image splits its top-K.
        threshold = float(all_scores[0, 19] + all_scores[0, 20]) / 2
        deploy.score_threshold = threshold
        num_dets, boxes, scores, labels = deploy(images)
    assert num_dets.dtype == torch.int32 and num_dets.shape == (2,)
    assert boxes.shape == (2, 50, 4) and boxes.dtype == torch.float32
    assert scores.shape == (2, 50) and labels.shape == (2, 50) and labels.dtype == torch.int32
    for i in range(2):
        n = int(num_dets[i])
        assert 0 < n < 50 and (i or n == 20)
        assert (scores[i, :n] > threshold).all() and (scores[i, n:] == 0).all()
        assert (boxes[i, n:] == 0).all() and (labels[i, n:] == 0).all()
        assert (scores[i, :n][:-1] >= scores[i, :n][1:]).all()
        # boxes are in input pixels, x1 <= x2
        assert (boxes[i, :n, 2] >= boxes[i, :n, 0]).all()
        assert boxes[i, :n].abs().max() < 2 * 384


def test_folded_deploy_matches_unfolded_student() -> None:
    recipe = load_recipe("thumbdet", overrides={"input_size": "256x384"})
    model, _ = build_training_model(recipe, None, log=quiet)
    deploy = model.deploy(recipe)
    images = torch.rand(1, 3, 256, 384) * 255
    with torch.no_grad():
        ref = model.student.eval()(images / 255.0)
        logits, boxes = deploy.raw(images)
    torch.testing.assert_close(logits, ref["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(boxes, ref["pred_boxes"], atol=1e-5, rtol=1e-4)


def test_moment_matching_is_zero_for_identical_statistics_and_positive_otherwise() -> None:
    x = torch.rand(2, 3, 64, 64)
    assert moment_matching_loss(x, x[:, :, ::4, ::4] * 0 + x.mean(dim=(2, 3), keepdim=True), 0.1) > 0
    y = x.clone()
    assert moment_matching_loss(x, y, 0.1).item() == pytest.approx(0.0, abs=1e-12)
    # mean shift of 0.1 in every channel -> (0.1)^2
    assert moment_matching_loss(x, x + 0.1, 0.1).item() == pytest.approx(0.01, rel=1e-4)


def test_query_filter_keeps_confident_teacher_queries() -> None:
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, 1, 2] = 2.0  # p = 0.88
    logits[0, 3, 0] = 0.1  # p = 0.52
    assert query_filter(logits, 0.5).tolist() == [[False, True, False, True]]


def test_one_training_step_gives_finite_losses_and_gradients() -> None:
    recipe = load_recipe("thumbdet", overrides={"input_size": "256x256"})
    model, _ = build_training_model(recipe, None, log=quiet)
    model.train()
    with torch.no_grad():  # a confident teacher so the Query Filter keeps queries
        model.teacher.class_embed[0].bias[5] = 4.0
    images = torch.rand(2, 3, 256, 256) * 255
    targets = [
        {"labels": torch.tensor([5, 7]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.2], [0.6, 0.5, 0.3, 0.3]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
    ]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = model.training_losses(images, targets)
    assert set(losses) == {"loss_mm", "loss_kd_logit", "loss_kd_feature", "loss_det"}
    for name, value in losses.items():
        assert torch.isfinite(value), name
        assert value.item() > 0, name
    before = model.student.backbone[0].down_sample[0].weight.detach().clone()
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("student.") for n, _ in trainable)
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert no_grad == []
    assert all(p.grad is None for p in model.teacher.parameters())
    optim.step()
    assert not torch.equal(before, model.student.backbone[0].down_sample[0].weight)


def test_without_distillation_weights_the_teacher_is_not_run() -> None:
    recipe = load_recipe(
        "thumbdet", overrides={"input_size": "256x256", "model": {"kd_logit_weight": 0.0, "kd_feature_weight": 0.0}}
    )
    model, _ = build_training_model(recipe, None, log=quiet)
    model.train()
    calls = []
    model.teacher.register_forward_hook(lambda *_: calls.append(1))
    images = torch.rand(1, 3, 256, 256) * 255
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    losses = model.training_losses(images, targets)
    assert set(losses) == {"loss_mm", "loss_det"} and calls == []
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())


def test_config_rejects_unknown_scale() -> None:
    from tod_deploy.errors import UserError

    with pytest.raises(UserError, match="scale must be 4, 2 or 1"):
        ThumbDetConfig.from_recipe(load_recipe("thumbdet", overrides={"model": {"scale": 3}}))


def bilinear_zero_padded(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """image [D, H, W] at normalized (x, y) in pixel-centre convention (align_corners=False), zeros outside."""
    _, h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    out = np.zeros(image.shape[0])
    for xi, wx in ((x0, x0 + 1 - px), (x0 + 1, px - x0)):
        for yi, wy in ((y0, y0 + 1 - py), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                out += wx * wy * image[:, yi, xi]
    return out


def test_ms_deform_attn_matches_a_numpy_reference() -> None:
    """Deformable-DETR's attention: per query and head, the attention-weighted sum over levels and points of
    the level's value map sampled bilinearly at the point (zero outside the map), heads concatenated."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3), (3, 1)]
    n, m, d, lq, points = 2, 2, 3, 5, 2
    value = torch.randn(n, sum(h * w for h, w in shapes), m, d, generator=gen)
    locations = torch.rand(n, lq, m, len(shapes), points, 2, generator=gen) * 1.4 - 0.2  # some off the map
    weights = torch.rand(n, lq, m, len(shapes), points, generator=gen)
    got = ms_deform_attn(value, shapes, 2 * locations - 1, weights).numpy()
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    expected = np.zeros((n, lq, m * d))
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for level, (h, w) in enumerate(shapes):
                    image = value[b, starts[level] : starts[level + 1], head].double().numpy().T.reshape(d, h, w)
                    for pt in range(points):
                        x, y = locations[b, q, head, level, pt].tolist()
                        sample = bilinear_zero_padded(image, x, y)
                        expected[b, q, head * d : (head + 1) * d] += float(weights[b, q, head, level, pt]) * sample
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_deformable_attention_samples_where_upstream_does() -> None:
    """MSDeformAttn folds 2 / (W, H) into its offset projection; upstream computes the sampling locations as
    reference + offsets / (W, H) and hands grid_sample 2 * locations - 1. Both must sample the same points."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    for param in attn.parameters():  # upstream's init zeroes the offset weights: randomize so they count
        torch.nn.init.normal_(param, std=0.5)
    shapes = [(6, 5), (3, 2)]
    n, lq = 2, 7
    query, value = torch.randn(n, lq, 16), torch.randn(n, sum(h * w for h, w in shapes), 16)
    reference = torch.rand(n, lq, len(shapes), 2)
    offsets = attn.sampling_offsets(query).view(n, lq, 2, len(shapes), 3, 2)
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    weights = attn.attention_weights(query).view(n, lq, 2, -1).softmax(-1).view(n, lq, 2, len(shapes), 3)
    values = attn.value_proj(value).view(n, value.shape[1], 2, -1)
    upstream = attn.output_proj(ms_deform_attn(values, shapes, 2 * locations - 1, weights))
    torch.testing.assert_close(attn(query, reference, value, shapes), upstream, rtol=1e-5, atol=1e-5)
