"""Bottom-heavy backbones: Table 4 figures, strides/channels, key names, export parity, training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tod_deploy.export.pipeline import export_model
from tod_deploy.models import build_training_model
from tod_deploy.nn.backbones.bottom_heavy import TABLE4, build_backbone
from tod_deploy.recipes import load_recipe


def quiet(_line: str) -> None:
    pass


def backbone_figures(name: str, h: int = 512, w: int = 640) -> tuple[float, float, list[torch.Size]]:
    """(M params, G multiply-adds, output shapes) of the backbone alone, as ``tod_deploy.complexity``
    counts (FlopCounterMode: convolutions and linear layers; multiply-adds = FLOPs / 2). On the meta
    device, so counting a 52 G multiply-add network costs no compute."""
    model = build_backbone(name).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        outs = model(torch.zeros(1, 3, h, w, device="meta"))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return params, counter.get_total_flops() / 2 / 1e9, [o.shape for o in outs]


@pytest.mark.parametrize("name", ["resnet50", "bh_resnet50", "hrnet32", "hrnet18"])
@pytest.mark.parametrize("hw", [(512, 640), (640, 512)])
def test_table4_within_two_percent(name: str, hw: tuple[int, int]) -> None:
    params, gmacs, _ = backbone_figures(name, *hw)
    paper_params, paper_gmacs = TABLE4[name]
    assert params == pytest.approx(paper_params, rel=0.02)
    assert gmacs == pytest.approx(paper_gmacs, rel=0.02)


# BH-HRNet is not public; our reading of Table 4 (see bottom_heavy.py) gives these figures.
BH_HRNET_READING = {"bh_hrnet32": (10.60, 32.88), "bh_hrnet18": (5.92, 20.52)}


@pytest.mark.parametrize("name", sorted(BH_HRNET_READING))
def test_bh_hrnet_documented_reading(name: str) -> None:
    params, gmacs, _ = backbone_figures(name)
    assert (round(params, 2), round(gmacs, 2)) == BH_HRNET_READING[name]
    assert params < TABLE4[name.removeprefix("bh_")][0]  # fewer parameters than the original, as the paper says


@pytest.mark.xfail(strict=True, reason="BH-HRNet's shallow branches are not given by the paper: figures miss Table 4")
@pytest.mark.parametrize("name", sorted(BH_HRNET_READING))
def test_bh_hrnet_table4(name: str) -> None:
    params, gmacs, _ = backbone_figures(name)
    assert params == pytest.approx(TABLE4[name][0], rel=0.02)
    assert gmacs == pytest.approx(TABLE4[name][1], rel=0.02)


@pytest.mark.parametrize("name", list(TABLE4))
def test_strides_and_channels(name: str) -> None:
    _, _, shapes = backbone_figures(name, 256, 320)
    assert [(s[2], s[3]) for s in shapes] == [(256 // k, 320 // k) for k in (4, 8, 16, 32)]
    assert tuple(s[1] for s in shapes) == tuple(build_backbone(name).out_channels)
    width = {"hrnet32": 32, "bh_hrnet32": 32, "hrnet18": 18, "bh_hrnet18": 18}.get(name)
    expected = (256, 512, 1024, 2048) if width is None else (width, 2 * width, 4 * width, 8 * width)
    assert tuple(s[1] for s in shapes) == expected


def test_bh_resnet50_layout() -> None:
    state = build_backbone("bh_resnet50").state_dict()
    depths = {i: len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)}
    assert depths == {1: 7, 2: 6, 3: 2, 4: 1}
    assert state["conv1.weight"].shape == (64, 3, 3, 3)
    for key in ("layer1.6.conv1.weight", "layer1.0.downsample.0.weight", "layer4.0.conv3.weight", "bn1.running_var"):
        assert key in state, key
    model = build_backbone("bh_resnet50")
    assert model.conv1.stride == (1, 1) and all(getattr(model, f"layer{i}")[0].conv2.stride == (2, 2) for i in (1, 2))


@pytest.mark.parametrize(
    ("backbone", "keys"),
    [
        ("hrnet32", ["backbone.conv2.weight", "backbone.bn2.weight", "backbone.layer1.3.conv3.weight",
                     "backbone.transition1.1.0.0.weight", "backbone.stage2.0.branches.1.3.conv2.weight",
                     "backbone.stage3.3.fuse_layers.2.0.1.0.weight", "backbone.stage4.2.fuse_layers.0.3.0.weight",
                     "backbone.stage4.0.fuse_layers.3.0.2.0.weight"]),
        ("bh_hrnet18", ["backbone.stage2.1.branches.0.3.conv1.weight", "backbone.stage4.1.branches.3.2.conv2.weight",
                        "backbone.stage4.0.fuse_layers.3.2.0.0.weight"]),
        ("bh_resnet50", ["backbone.layer1.6.conv1.weight", "backbone.layer4.0.downsample.1.running_mean"]),
    ],
)  # fmt: skip
def test_detector_key_names(backbone: str, keys: list[str]) -> None:
    recipe = load_recipe("bh", None, {"model": {"backbone": backbone, "detector": "faster_rcnn"}})
    model, _ = build_training_model(recipe, None, log=quiet)
    state = model.state_dict()
    for key in [
        *keys,
        "neck.lateral_convs.0.conv.weight",
        "rpn_head.rpn_conv.weight",
        "roi_head.bbox_head.fc_cls.weight",
    ]:
        assert key in state, key
    if backbone == "hrnet32":
        assert state["backbone.conv1.weight"].shape == (64, 3, 3, 3)
        assert state["neck.lateral_convs.3.conv.weight"].shape == (256, 256, 1, 1)
        assert not any(k.startswith("backbone.stage2.1.") for k in state)  # HRNet: 1/4/3 modules
        assert any(k.startswith("backbone.stage3.3.") for k in state) and any(
            k.startswith("backbone.stage4.2.") for k in state
        )


@pytest.mark.parametrize(
    ("backbone", "detector"),
    [
        ("bh_hrnet18", "faster_rcnn"),
        pytest.param("bh_resnet50", "retinanet", marks=pytest.mark.slow),  # RetinaNet as DFR-Det's and SR-TOD's
        pytest.param("hrnet18", "fcos", marks=pytest.mark.slow),  # HRNet as bh_hrnet18, FCOS as DFR-Det's
    ],
)
def test_export_parity(tmp_path: Path, backbone: str, detector: str) -> None:
    model = {"backbone": backbone, "detector": detector, "rpn_nms_pre": 300, "rpn_max_per_img": 200}
    result = export_model("bh", tmp_path, overrides={"input_size": "128x160", "model": model}, log=quiet)
    assert result.verification.ok


@pytest.mark.parametrize("detector", ["faster_rcnn", "fcos"])
def test_training_step(detector: str) -> None:
    torch.manual_seed(0)
    recipe = load_recipe(
        "bh", None, {"input_size": "128x160", "model": {"backbone": "bh_hrnet18", "detector": detector}}
    )
    model, _ = build_training_model(recipe, None, log=quiet)
    model.train()
    images = torch.rand(2, 3, 128, 160) * 255
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 30.0, 28.0], [60.0, 40.0, 72.0, 56.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[100.0, 80.0, 116.0, 100.0]]), "labels": torch.tensor([5])},
    ]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    losses = model.training_losses(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    optimizer.zero_grad()
    sum(losses.values()).backward()
    grad = model.backbone.stage2[0].branches[0][0].conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    optimizer.step()


def test_inspect_backbone_only_matches_table4() -> None:
    """``inspect --backbone-only``: the backbone's own figures beside Table 4's, from the full detector."""
    from tod_deploy.inspection import inspect_method

    result = inspect_method(
        "bh", None, {"input_size": "640x512", "model": {"backbone": "bh_resnet50"}}, None, backbone_only=True
    )
    params, gmacs, _ = backbone_figures("bh_resnet50", 640, 512)
    assert list(result["parts"]) == ["bh_resnet50"]
    # the deploy model has BN folded into conv biases: C instead of 2C parameters per BN layer
    assert result["parameters"] / 1e6 == pytest.approx(params, rel=0.005) and result["parameters"] / 1e6 < params
    assert result["gmacs"] == pytest.approx(gmacs, rel=1e-6)
    assert (result["paper"]["params_m"], result["paper"]["gmacs"]) == TABLE4["bh_resnet50"]
    other = inspect_method("bh", None, {"input_size": "512x512"}, None, backbone_only=True)
    assert other["paper"] == {}  # Table 4 is at 640x512 only
