"""DFR-Det: 1-bit FCOS export in every binary-conv mode (fused, unfused, decomposed), the paper's size
figures, training step."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from tod_deploy.artifacts import Sidecar
from tod_deploy.errors import UserError
from tod_deploy.export.pipeline import ExportResult, export_model, rebuild_deploy_model
from tod_deploy.export.verify import verify_onnx
from tod_deploy.inspection import inspect_method
from tod_deploy.models import build_deploy_model, build_training_model
from tod_deploy.nn.binary import BinaryConv2d
from tod_deploy.recipes import load_recipe

SMALL = {"input_size": "256x256"}


def quiet(_line: str) -> None:
    pass


def confident_checkpoint(path: Path, **model: object) -> Path:
    """Seeded weights with the class bias raised, so detections exist to compare."""
    trained, _ = build_training_model(load_recipe("dfr_det", overrides={**SMALL, "model": model}), None, log=quiet)
    with torch.no_grad():
        trained.bbox_head.conv_cls.bias.fill_(0.0)
    torch.save({"state_dict": trained.state_dict()}, path)
    return path


def test_binary_layers_where_the_paper_puts_them() -> None:
    model, _ = build_training_model(load_recipe("dfr_det", overrides=SMALL), None, log=quiet)
    binary = {n for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    assert "backbone.layer1.0.conv1" in binary and "bbox_head.cls_convs.0.conv" in binary
    assert len([n for n in binary if n.startswith("backbone.")]) == 16  # every 3x3 of the residual stages
    real = ("backbone.conv1", "backbone.layer2.0.downsample.1", "bbox_head.conv_cls", "neck.fpn_convs.0.conv")
    for name in real:
        assert isinstance(model.get_submodule(name), torch.nn.Conv2d), name


def test_deploy_drops_the_decoder() -> None:
    recipe = load_recipe("dfr_det", overrides=SMALL)
    model, _ = build_training_model(recipe, None, log=quiet)
    assert any(n.startswith("decoder.") for n, _ in model.named_parameters())
    deploy = model.deploy(recipe)
    assert not any("decoder" in n for n, _ in deploy.named_modules())
    # BN of the 1-bit layers folded into their alpha and bias: no BatchNorm left.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())


def test_one_training_step() -> None:
    model, _ = build_training_model(load_recipe("dfr_det", overrides=SMALL), None, log=quiet)
    model.train()
    images = torch.rand(2, 3, 256, 256) * 255
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 18.0, 30.0], [100.0, 100.0, 170.0, 150.0]]),
         "labels": torch.tensor([1, 4])},
        {"boxes": torch.tensor([[50.0, 60.0, 56.0, 64.0]]), "labels": torch.tensor([0])},
    ]  # fmt: skip
    losses = model.training_losses(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness", "loss_dfr", "loss_weight_rec"}
    for name, value in losses.items():
        assert torch.isfinite(value) and value.item() > 0, name
    sum(losses.values()).backward()
    for name, p in model.decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    latent = model.backbone.get_submodule("layer3.0.conv1").weight
    assert latent.grad.abs().sum() > 0  # the STE reaches the latent weights


@pytest.mark.parametrize("mode", ["plugin", "plugin-unfused", "decompose"])
def test_export_parity_in_every_mode(tmp_path: Path, mode: str) -> None:
    ckpt = confident_checkpoint(tmp_path / "dfr.pth")
    result = export_model("dfr_det", tmp_path, checkpoint=ckpt, overrides={**SMALL, "binary_conv": mode}, log=quiet)
    report = result.verification
    assert report.ok, report.failure()
    assert all(o.failing == 0 and o.max_abs <= o.atol for o in report.outputs)  # atol: policy.dense_atol
    assert report.detections.checked >= 50 and report.detections.matched == report.detections.checked
    model = onnx.load(str(result.onnx_path))
    custom = [n for n in model.graph.node if n.domain == "tod"]
    assert not any(init.name.startswith("decoder") or ".decoder." in init.name for init in model.graph.initializer)
    if mode.startswith("plugin"):
        # 16 backbone layers, and the 8 tower convs of the head once per pyramid level (5)
        assert len(custom) == 16 + 8 * 5 and {n.op_type for n in custom} == {"BinaryConv2d"}
        # Within 25% of the paper's 1-bit size (15.47 MB): weights really are stored as bits.
        assert abs(result.onnx_path.stat().st_size / 15.47e6 - 1) < 0.25
        # Every layer is a Bi-Real block, prelu(conv + shortcut): fused by default, 56 x (Add, PRelu) left otherwise
        activations = {helper.get_attribute_value(a) for n in custom for a in n.attribute if a.name == "activation"}
        prelus = sum(n.op_type == "PRelu" for n in model.graph.node)
        assert (activations, prelus) == (({b"prelu"}, 0) if mode == "plugin" else ({b"none"}, len(custom)))
        assert report.decision("binary layers").output.max_abs == 0.0
    else:
        assert custom == []


@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn"])
def test_other_detectors_export_with_parity(tmp_path: Path, detector: str) -> None:
    result = export_model(
        "dfr_det", tmp_path, overrides={**SMALL, "model": {"detector": detector, "rpn_max_per_img": 200}}, log=quiet
    )
    report = result.verification
    assert report.ok, report.failure()
    assert report.teacher_forced_layers == (16 + 8 * 5 if detector == "retinanet" else 16)
    assert report.decision("binary layers").output.max_abs < 1e-4


def test_teacher_forcing_is_what_makes_parity_exact(dfr_plugin_small: ExportResult) -> None:
    """Without it, one rounding-level sign flip would cascade; with it every binary layer is exact,
    fused epilogue included, and a wrong epilogue (one slope off by 0.1%) is caught there."""
    result = dfr_plugin_small
    layers = result.verification.decision("binary layers").output
    assert layers.total > 1_000_000 and layers.max_abs == 0.0
    model = onnx.load(str(result.onnx_path))
    node = next(n for n in model.graph.node if n.op_type == "BinaryConv2d")
    slope = next(i for i in model.graph.initializer if i.name == node.input[5])
    values = numpy_helper.to_array(slope).copy()
    values[:] *= 1.001
    slope.CopyFrom(numpy_helper.from_array(values, slope.name))
    sidecar = Sidecar.load(result.onnx_path)
    report = verify_onnx(model, rebuild_deploy_model(sidecar, quiet), sidecar.recipe, seeds=(0,))
    wrong = report.decision("binary layers").output
    assert not report.ok and wrong.failing > 0 and wrong.max_abs > 0


def test_paper_size_figures() -> None:
    one_bit = inspect_method("dfr_det", None, {}, None, log=quiet)
    real = inspect_method("dfr_det", "real", {}, None, log=quiet)
    assert abs(one_bit["size_mb"] / 15.47 - 1) < 0.10
    assert abs(real["size_mb"] / 76.44 - 1) < 0.10
    assert abs(real["gops"] / 318.25 - 1) < 0.10
    # 1-bit OPs in BiDet's convention; see the issue note for why the paper's 23.08 is not reached.
    expected = (one_bit["macs"] - one_bit["binary_macs"]) / 1e9 + one_bit["binary_macs"] / 64e9
    assert one_bit["gops"] == pytest.approx(expected)
    assert real["gops"] / one_bit["gops"] > 7


def test_checkpoint_with_other_binary_options_names_the_layer(tmp_path: Path) -> None:
    ckpt = confident_checkpoint(tmp_path / "ida.pth", alpha="learned")
    expected = r"checkpoint layer backbone\.layer1\.0\.conv1 has a learned alpha.*alpha: learned"
    with pytest.raises(UserError, match=expected):
        build_deploy_model(load_recipe("dfr_det", overrides=SMALL), ckpt, log=quiet)
    build_deploy_model(load_recipe("dfr_det", overrides={**SMALL, "model": {"alpha": "learned"}}), ckpt, log=quiet)
