"""The public BH-ResNet50 TinyPerson model: Faster R-CNN + SSPNet's SSFPN neck, 12 anchors, 1 class, soft-NMS.

The upstream key list is derived here from the upstream module definitions (mmdet 2.19 building
``FasterSSPNet`` from ``TinyPerson/configs/_base_/models/faster_rcnn_bh50_sspnet.py``), not from our
model, and saved the way mmcv 1.x ``save_checkpoint`` does; loading it must leave nothing missing
or unexpected, and its export must match PyTorch and pass the TensorRT operator check.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from soft_nms_reference import mmcv_soft_nms

from tod_deploy.errors import UserError
from tod_deploy.export.pipeline import ExportResult, export_model
from tod_deploy.methods.bh import SPEC, BHConfig
from tod_deploy.models import build_deploy_model, build_training_model
from tod_deploy.nn.anchors import decode_deltas
from tod_deploy.nn.heads.rpn import level_anchors, propose
from tod_deploy.nn.necks.ssfpn import SSFPN
from tod_deploy.recipes import load_recipe
from tod_deploy.weights import load_checkpoint

SIZE = "128x160"  # small: the SSFPN context conv alone is 1024 -> 256 3x3 at a quarter of the input
BH50_STAGES = (7, 6, 2, 1)


def quiet(_line: str) -> None:
    pass


def batchnorm(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


def conv(prefix: str, cout: int, cin: int, k: int, *, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (cout, cin, k, k)} | ({f"{prefix}.bias": (cout,)} if bias else {})


def bh_resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """mmdet ResNet (depth 50, pytorch style) with BHResNet's stem: 3x3 conv1 and (7, 6, 2, 1) bottlenecks."""
    shapes = conv("backbone.conv1", 64, 3, 3, bias=False) | batchnorm("backbone.bn1", 64)
    cin = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), BH50_STAGES, strict=True), start=1):
        for block in range(blocks):
            p = f"backbone.layer{stage}.{block}"
            shapes |= conv(f"{p}.conv1", planes, cin, 1, bias=False) | batchnorm(f"{p}.bn1", planes)
            shapes |= conv(f"{p}.conv2", planes, planes, 3, bias=False) | batchnorm(f"{p}.bn2", planes)
            shapes |= conv(f"{p}.conv3", planes * 4, planes, 1, bias=False) | batchnorm(f"{p}.bn3", planes * 4)
            if block == 0:
                shapes |= conv(f"{p}.downsample.0", planes * 4, cin, 1, bias=False)
                shapes |= batchnorm(f"{p}.downsample.1", planes * 4)
            cin = planes * 4
    return shapes


def ssfpn_shapes() -> dict[str, tuple[int, ...]]:
    """SSFPN(in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5): ConvModules without norm
    (so with bias), no extra convs (P6 by max-pool), and CAM(256): dila_conv = [conv 1024->256 3x3,
    ASPP(256, 64) with dilations (1, 2, 5, 1), conv 3x3, BN, ReLU], 4 down_conv and 4 att_conv (-> 1)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate((256, 512, 1024, 2048)):
        shapes |= conv(f"neck.lateral_convs.{i}.conv", 256, c, 1) | conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3)
    shapes |= conv("neck.CAM.dila_conv.0", 256, 1024, 3)
    for j, k in enumerate((1, 3, 3, 1)):
        shapes |= conv(f"neck.CAM.dila_conv.1.aspp.{j}", 64, 256, k)
    shapes |= conv("neck.CAM.dila_conv.2", 256, 256, 3) | batchnorm("neck.CAM.dila_conv.3", 256)
    for i in range(4):
        shapes |= conv(f"neck.CAM.down_conv.{i}", 256, 256, 3) | conv(f"neck.CAM.att_conv.{i}", 1, 256, 3)
    return shapes


def heads_shapes() -> dict[str, tuple[int, ...]]:
    """RPNHead: 4 scales x 3 ratios = 12 anchors, sigmoid objectness (12 channels); Shared2FCBBoxHead with
    num_classes=1 (fc_cls: 1 + background) and class-specific regression (reg_class_agnostic=False: 4 x 1)."""
    head = "roi_head.bbox_head"
    fcs = {f"{head}.shared_fcs.0.weight": (1024, 256 * 7 * 7), f"{head}.shared_fcs.1.weight": (1024, 1024)}
    fcs |= {f"{head}.fc_cls.weight": (2, 1024), f"{head}.fc_reg.weight": (4, 1024)}
    fcs |= {key.replace(".weight", ".bias"): shape[:1] for key, shape in fcs.items()}
    rpn = conv("rpn_head.rpn_conv", 256, 256, 3) | conv("rpn_head.rpn_cls", 12, 256, 1)
    return rpn | conv("rpn_head.rpn_reg", 48, 256, 1) | fcs


UPSTREAM = bh_resnet50_shapes() | ssfpn_shapes() | heads_shapes()


# The box layers stay small, as mmdet initialises them and training keeps them: with fan-in scaled
# weights their deltas would be several units, i.e. degenerate sub-pixel boxes.
OUTPUT_LAYER_SCALE = {"rpn_head.rpn_cls": 0.2, "rpn_head.rpn_reg": 0.05, "roi_head.bbox_head.fc_reg": 0.1}


def upstream_state_dict(seed: int = 11) -> dict[str, torch.Tensor]:
    """Trained-looking values: fan-in scaled weights, BN statistics away from identity, small biases."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in UPSTREAM.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(36000)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) > 1:
            scale = OUTPUT_LAYER_SCALE.get(key.removesuffix(".weight"), 1.0) / float(np.prod(shape[1:])) ** 0.5
            sd[key] = scale * torch.randn(shape, generator=gen)
        elif ".bn" in key or "downsample.1" in key or "dila_conv.3" in key:
            base = 1.0 if key.endswith(".weight") else 0.0
            sd[key] = base + 0.1 * torch.randn(shape, generator=gen)
        else:
            sd[key] = 0.01 * torch.randn(shape, generator=gen)
    return sd


# The training config as mmcv's Config.pretty_text would store it (the settings that matter here).
CONFIG_TEXT = """model = dict(
    type='FasterSSPNet',
    backbone=dict(type='BHResNet', depth=50, strides=(2, 2, 2, 2)),
    neck=dict(type='SSFPN', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
    rpn_head=dict(
        type='RPNHead', in_channels=256, feat_channels=256,
        anchor_generator=dict(type='AnchorGenerator', scales=[1.5, 2.5, 3.7, 8], ratios=[0.4, 0.8, 1.4],
                              strides=[4, 8, 16, 32, 64])),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_head=dict(type='Shared2FCBBoxHead', num_classes=1, reg_class_agnostic=False)))
test_cfg = dict(
    rpn=dict(nms_across_levels=False, nms_pre=1000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7),
             min_bbox_size=0),
    rcnn=dict(score_thr=0.05, nms=dict(type='soft_nms', iou_threshold=0.3, min_score=0.05), max_per_img=500))
data = dict(test=dict(type='CocoDataset', pipeline=[
    dict(type='LoadSubImageFromFile'),
    dict(type='MultiScaleFlipAug', img_scale=[(1280, 1024), (1920, 1536)], flip=False,
         transforms=[dict(type='Resize', keep_ratio=True), dict(type='Pad', size_divisor=32)])]))
"""


def save_mmcv_checkpoint(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """mmcv 1.x ``save_checkpoint`` as mmdet 2's runner calls it: meta, state_dict, optimizer."""
    meta = {"mmdet_version": "2.19.0", "mmcv_version": "1.4.7", "CLASSES": ("person",), "config": CONFIG_TEXT,
            "epoch": 12, "iter": 26136, "time": "Mon Mar 14 10:00:00 2022", "seed": 0, "exp_name": "bh_sspnet.py",
            "env_info": "sys.platform: linux", "hook_msgs": {"last_ckpt": "work_dirs/epoch_12.pth"}}  # fmt: skip
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(64, 3, 3, 3)}},
                 "param_groups": [{"lr": 2e-5, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}]}  # fmt: skip
    torch.save({"meta": meta, "state_dict": state_dict, "optimizer": optimizer}, path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bh_sspnet") / "bh_sspnet_epoch_12.pth"
    save_mmcv_checkpoint(path, upstream_state_dict())
    return path


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """One verified export, shared: the public model's recipe at a small input size."""
    out = tmp_path_factory.mktemp("bh_sspnet_export")
    return export_model("bh", out, checkpoint, variant="tinyperson", overrides={"input_size": SIZE}, log=quiet)


def test_upstream_layout_counts() -> None:
    """What the public checkpoint holds, per top-level module."""
    assert Counter(k.split(".")[0] for k in UPSTREAM) == {"backbone": 318, "neck": 49, "rpn_head": 6, "roi_head": 8}


def test_model_has_exactly_the_upstream_keys() -> None:
    model, _ = build_training_model(load_recipe("bh", "tinyperson"), None, log=quiet)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(UPSTREAM)) == [] and sorted(set(UPSTREAM) - set(ours)) == []
    assert {k: s for k, s in ours.items() if UPSTREAM[k] != s} == {}
    assert isinstance(model.neck, SSFPN) and model.rpn_head.anchors.per_location == 12


def test_checkpoint_loads_with_nothing_missing_or_unexpected(checkpoint: Path) -> None:
    recipe = load_recipe("bh", "tinyperson")
    model, _ = build_training_model(recipe, None, log=quiet)
    report = load_checkpoint(model, checkpoint, SPEC)
    # Unexpected keys are reported (LoadReport.unexpected) or refused, as the loader's version has it.
    assert (report.loaded, report.missing, getattr(report, "unexpected", [])) == (len(UPSTREAM), [], [])
    assert report.training_only_ignored == [] and report.training_only_loaded == []
    state = model.state_dict()
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for key in ("neck.CAM.att_conv.3.weight", "neck.CAM.dila_conv.1.aspp.2.weight", "rpn_head.rpn_cls.weight",
                "backbone.layer1.6.conv2.weight", "roi_head.bbox_head.fc_reg.bias"):  # fmt: skip
        assert torch.equal(state[key], saved[key]), key
    lines: list[str] = []
    build_training_model(recipe, checkpoint, log=lines.append)
    assert f"checkpoint: loaded {len(UPSTREAM)} tensors" in lines
    assert not any("missing" in line or "unexpected" in line for line in lines), lines


def test_plain_fpn_recipe_names_the_fix(checkpoint: Path) -> None:
    model, _ = build_training_model(load_recipe("bh", None, {"model": {"num_classes": 1}}), None, log=quiet)
    with pytest.raises(UserError, match="SSFPN") as err:
        load_checkpoint(model, checkpoint, SPEC)
    assert "--preset tinyperson" in err.value.fix


def test_soft_nms_is_for_faster_rcnn_only() -> None:
    with pytest.raises(UserError, match="soft_nms is for the Faster R-CNN detectors"):
        BHConfig.from_recipe(load_recipe("bh", None, {"model": {"detector": "retinanet", "nms_type": "soft_nms"}}))
    with pytest.raises(UserError, match="unknown soft_nms_method"):
        BHConfig.from_recipe(load_recipe("bh", "tinyperson", {"model": {"soft_nms_method": "naive"}}))


def test_recipe_carries_upstream_test_settings() -> None:
    recipe = load_recipe("bh", "tinyperson")
    cfg = BHConfig.from_recipe(recipe)
    assert recipe.input_size == (1024, 1280) and recipe.top_k == 500 and recipe.score_threshold == 0.05
    assert (cfg.rpn_nms_pre, cfg.rpn_max_per_img, cfg.rpn_iou, cfg.num_classes) == (1000, 1000, 0.7, 1)
    soft = cfg.soft_nms()
    assert soft is not None and (soft.iou_threshold, soft.min_score, soft.method) == (0.3, 0.05, "linear")
    assert soft.candidates >= cfg.rpn_max_per_img * cfg.num_classes  # every candidate enters: exact mmcv result
    anchors = cfg.anchors()
    assert anchors.scales == (1.5, 2.5, 3.7, 8.0) and anchors.ratios == (0.4, 0.8, 1.4)


@pytest.mark.slow
def test_export_parity(exported: ExportResult) -> None:
    report = exported.verification
    assert report is not None and report.ok, report.failure()
    assert report.detections.checked > 0 and report.detections.near_ties <= report.detections.checked // 100
    assert exported.sidecar["recipe"]["model"]["detector"] == "faster_rcnn_sspnet"
    ops = exported.sidecar["onnx"]["ops"]
    assert ops["Loop"] == 1 and ops["NonMaxSuppression"] == 1  # soft-NMS for the boxes, hard NMS for proposals
    assert exported.sidecar["io"]["outputs"][1]["shape"] == [1, 500, 4]


@pytest.mark.slow  # shares test_export_parity's export
def test_tensorrt_check_accepts_the_export(exported: ExportResult) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tod_deploy.cli", "check", "--target", "tensorrt", str(exported.onnx_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Loop" in proc.stdout


def test_detections_are_mmcv_soft_nms_of_the_rcnn_candidates(checkpoint: Path) -> None:
    """mmdet's multiclass_nms(soft_nms): score_thr cut, soft-NMS, first max_per_img picks - on the same
    candidates, the deploy model's detections are the reference's, in the same order."""
    recipe = load_recipe("bh", "tinyperson", {"input_size": SIZE})
    deploy, _ = build_deploy_model(recipe, checkpoint, log=quiet)
    images = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(3)) * 255
    hw = (128, 160)
    net = deploy.net
    with torch.no_grad():
        out = deploy.run(images)
        feats = net.features(images)
        obj, reg = net.rpn_head.flat(feats)
        anchors = level_anchors(feats, net.rpn_head.anchors)
        proposals, _, valid = propose(obj, reg, anchors, hw, deploy.settings.proposal)
        logits, deltas = net.roi_head.raw(feats[:4], proposals)
    probs = torch.softmax(logits, dim=-1)[:, 0]
    boxes = decode_deltas(proposals[0], deltas, net.roi_head.bbox_head.stds, hw)
    candidates = (valid[0] & (probs > 0.05)).nonzero().squeeze(1).numpy()
    keep, kept = mmcv_soft_nms(boxes.numpy()[candidates], probs.numpy()[candidates], iou_threshold=0.3,
                               min_score=0.05, method="linear")  # fmt: skip
    keep, kept = candidates[keep][:500], kept[:500]
    n = int(out["num_dets"][0])
    assert n == len(keep) and n > 50
    np.testing.assert_array_equal(out["boxes"][0, :n].numpy(), boxes.numpy()[keep])
    np.testing.assert_array_equal(out["scores"][0, :n].numpy(), kept)
    assert not out["labels"][0].any() and not out["scores"][0, n:].any()


def test_training_step() -> None:
    """The training form runs the RPN and R-CNN losses on a synthetic batch; gradients reach the attention."""
    torch.manual_seed(0)
    model, _ = build_training_model(load_recipe("bh", "tinyperson", {"input_size": SIZE}), None, log=quiet)
    model.train()
    images = torch.rand(1, 3, 128, 160) * 255
    boxes = torch.tensor([[10.0, 12.0, 18.0, 28.0], [60.0, 40.0, 66.0, 52.0]])  # two tiny persons
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 0])}]
    losses = model.training_losses(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "s0.loss_cls", "s0.loss_bbox"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for param in (model.neck.CAM.att_conv[2].weight, model.neck.CAM.dila_conv[0].weight, model.backbone.conv1.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def test_a_checkpoint_brings_its_own_test_settings(checkpoint: Path, tmp_path: Path) -> None:
    """Without the preset, the checkpoint's class count, names, anchors and soft-NMS come from the file."""
    flags = {"input_size": SIZE, "model": {"detector": "faster_rcnn_sspnet"}}
    lines: list[str] = []
    result = export_model("bh", tmp_path, checkpoint, overrides=flags, verify=False, log=lines.append)
    recipe, settings = result.sidecar["recipe"], result.sidecar["settings"]
    model = recipe["model"]
    assert (model["num_classes"], recipe["classes"]) == (1, ["person"])
    assert (model["anchor_scale"], model["anchor_ratios"]) == ([1.5, 2.5, 3.7, 8], [0.4, 0.8, 1.4])
    assert (model["nms_type"], model["nms_iou"], model["soft_nms_min_score"]) == ("soft_nms", 0.3, 0.05)
    assert (recipe["top_k"], recipe["score_threshold"]) == (500, 0.05)
    assert settings["model.nms_type"]["from"].startswith("checkpoint config")
    assert settings["input_size"]["from"] == "flag"
