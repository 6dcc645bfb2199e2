"""SR-TOD: key layout, checkpoints, the learnable-threshold sign, training step, export parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tod_deploy.errors import UserError
from tod_deploy.export.pipeline import export_model
from tod_deploy.models import build_deploy_model, build_training_model
from tod_deploy.nn.binary_threshold import sign_ste
from tod_deploy.recipes import load_recipe

SMALL = {"input_size": "256x256", "top_k": 100}
RPN = {"rpn_nms_pre": 300, "rpn_max_per_img": 200}


def quiet(_line: str) -> None:
    pass


def recipe(detector: str = "faster_rcnn", preset: str | None = None, **model: object):
    return load_recipe("sr_tod", preset, {**SMALL, "model": {"detector": detector, **RPN, **model}})


@pytest.mark.parametrize(
    ("detector", "keys"),
    [
        ("faster_rcnn", ["rpn_head.rpn_conv.weight", "roi_head.bbox_head.shared_fcs.0.weight",
                         "roi_head.bbox_head.fc_reg.weight"]),
        ("cascade_rcnn", ["roi_head.bbox_head.0.fc_cls.weight", "roi_head.bbox_head.2.fc_reg.bias"]),
        ("retinanet", ["bbox_head.cls_convs.3.conv.weight", "bbox_head.retina_cls.weight",
                       "neck.fpn_convs.4.conv.weight"]),
    ],
)  # fmt: skip
def test_upstream_key_names(detector: str, keys: list[str]) -> None:
    model, _ = build_training_model(recipe(detector), None, log=quiet)
    state = model.state_dict()
    common = [
        "backbone.conv1.weight", "backbone.layer4.2.bn3.running_var", "neck.lateral_convs.0.conv.weight",
        "rh.up1.up.weight", "rh.up1.up.bias", "rh.up1.conv.double_conv.0.weight", "rh.up2.conv.double_conv.2.weight",
        "rh.out_conv.conv.0.weight", "rh.out_conv.conv.0.bias", "dgfe.mlp.1.weight", "dgfe.mlp.3.bias",
        "learnable_thresh",
    ]  # fmt: skip
    for key in common + keys:
        assert key in state, key
    assert state["learnable_thresh"].shape == () and state["dgfe.mlp.1.weight"].shape == (16, 256)
    assert state["rh.up1.up.weight"].shape == (256, 128, 4, 4)


def test_presets_follow_upstream_settings() -> None:
    aitod, visdrone, drones = (load_recipe("sr_tod", p) for p in ("aitod", "visdrone", "droneswarms"))
    assert aitod.input_size == (800, 800) and aitod.model["num_classes"] == 8
    assert aitod.model["thresh_init"] == pytest.approx(3 / 255)
    assert visdrone.input_size == (1280, 1280) and visdrone.model["num_classes"] == 10
    assert visdrone.model["anchor_scale"] == 6
    assert drones.model["num_classes"] == 1 and drones.top_k == 100 and drones.model["anchor_scale"] == 2
    with pytest.raises(UserError, match="no variant 'coco'"):
        load_recipe("sr_tod", "coco")
    with pytest.raises(UserError, match="unknown detector 'yolo'"):
        build_training_model(recipe("yolo"), None, log=quiet)


def test_upstream_checkpoint_loads_with_no_missing_keys(tmp_path: Path) -> None:
    source, _ = build_training_model(recipe("cascade_rcnn"), None, seed=3, log=quiet)
    torch.save({"meta": {"epoch": 12}, "state_dict": source.state_dict()}, tmp_path / "sr_tod.pth")
    lines: list[str] = []
    deploy, _ = build_deploy_model(recipe("cascade_rcnn"), tmp_path / "sr_tod.pth", log=lines.append)
    assert lines == [
        f"checkpoint: mmcv format, {len(source.state_dict())} tensors; not used: meta",
        f"checkpoint: loaded {len(source.state_dict())} tensors",
    ]
    assert deploy.net.learnable_thresh.item() == source.learnable_thresh.item()


def test_class_count_mismatch_is_named(tmp_path: Path) -> None:
    source, _ = build_training_model(recipe(num_classes=10), None, log=quiet)
    torch.save(source.state_dict(), tmp_path / "visdrone.pth")
    with pytest.raises(
        UserError, match=r"roi_head\.bbox_head\.fc_cls\.weight has shape \(11, 1024\), the model needs \(9, 1024\)"
    ):
        build_deploy_model(recipe(), tmp_path / "visdrone.pth", log=quiet)


def test_sign_ste_gradients() -> None:
    x = torch.tensor([-0.2, 0.0, 0.3, 0.1], requires_grad=True)
    t = torch.tensor(0.1, requires_grad=True)
    mask = (sign_ste(x - t) + 1) * 0.5
    assert mask.tolist() == [0.0, 0.0, 1.0, 0.5]  # sign(0) = 0 gives the 0.5 case
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (mask * upstream).sum().backward()
    assert torch.equal(x.grad, upstream * 0.5)  # d mask / dx = 0.5 * identity
    assert t.grad.item() == pytest.approx(-0.5 * upstream.sum().item())


@pytest.mark.parametrize("detector", ["faster_rcnn", "cascade_rcnn", "retinanet"])
def test_one_training_step(detector: str) -> None:
    model, _ = build_training_model(recipe(detector), None, log=quiet)
    model.train()
    images = torch.rand(2, 3, 256, 256) * 255
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 18.0, 30.0], [100.0, 100.0, 140.0, 132.0]]),
         "labels": torch.tensor([1, 4])},
        {"boxes": torch.tensor([[50.0, 60.0, 56.0, 64.0]]), "labels": torch.tensor([0])},
    ]  # fmt: skip
    losses = model.training_losses(images, targets)
    assert "loss_rec" in losses and len(losses) >= 3
    for name, value in losses.items():
        assert torch.isfinite(value), name
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01).zero_grad()
    sum(losses.values()).backward()
    assert model.learnable_thresh.grad is not None and model.learnable_thresh.grad.item() != 0.0
    for name, p in model.rh.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.backbone.layer1.parameters())  # frozen stage, as upstream


@pytest.fixture(scope="module")
def threshold_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, float]:
    """A checkpoint whose RH outputs exactly 0.5 and whose threshold equals D at some pixels."""
    out = tmp_path_factory.mktemp("srtod")
    model, _ = build_training_model(recipe(), None, log=quiet)
    with torch.no_grad():
        model.rh.out_conv.conv[0].weight.zero_()
        model.rh.out_conv.conv[0].bias.zero_()  # sigmoid(0) = 0.5 everywhere
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (1, 3, 256, 256), generator=gen).float()
    diff = (0.5 - images / 255.0).abs().mean(dim=1)
    threshold = float(diff[0, 7, 9])
    with torch.no_grad():
        model.learnable_thresh.fill_(threshold)
    torch.save(model.state_dict(), out / "ckpt.pth")
    return out / "ckpt.pth", images.numpy(), threshold


def test_mask_is_bit_identical_including_the_half_case(tmp_path: Path, threshold_case: tuple) -> None:
    ckpt, images, threshold = threshold_case
    result = export_model(
        "sr_tod", tmp_path, checkpoint=ckpt, overrides={**SMALL, "model": RPN}, extras=("diff_map", "binary_mask"),
        log=quiet,
    )  # fmt: skip
    assert result.verification.ok
    model = onnx.load(str(result.onnx_path))
    assert [o.name for o in model.graph.output] == ["num_dets", "boxes", "scores", "labels", "diff_map", "binary_mask"]
    assert "Sign" in {n.op_type for n in model.graph.node}
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": images}), strict=True))
    deploy, _ = build_deploy_model(load_recipe("sr_tod", overrides={**SMALL, "model": RPN}), ckpt, log=quiet)
    with torch.no_grad():
        want = deploy.run(torch.from_numpy(images))
    ref_mask = want["binary_mask"].numpy()
    assert np.array_equal(got["binary_mask"], ref_mask)
    assert (ref_mask == 0.5).sum() >= 1 and ref_mask[0, 0, 7, 9] == 0.5
    assert set(np.unique(ref_mask)) <= {0.0, 0.5, 1.0}


@pytest.mark.parametrize(
    "detector",
    [
        "faster_rcnn",
        pytest.param("cascade_rcnn", marks=pytest.mark.slow),  # the RoI stage three times; test_full_size too
        pytest.param("retinanet", marks=pytest.mark.slow),  # test_cli exports and verifies it (visualize)
    ],
)
def test_export_parity_per_detector(tmp_path: Path, detector: str) -> None:
    model, _ = build_training_model(recipe(detector), None, log=quiet)
    if detector == "retinanet":  # random heads score below 0.05; make some detections to compare
        with torch.no_grad():
            model.bbox_head.retina_cls.bias.fill_(-1.0)
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    result = export_model(
        "sr_tod", tmp_path, checkpoint=tmp_path / "ckpt.pth",
        overrides={**SMALL, "model": {"detector": detector, **RPN}}, log=quiet,
    )  # fmt: skip
    report = result.verification
    assert report.ok, report.failure()
    assert {o.name for o in report.outputs} >= {"diff_map", "binary_mask"}
    assert all(o.max_abs <= o.atol for o in report.outputs)  # every element within the applied atol
    assert report.detections.checked >= 50 and report.detections.count_diff == 0
    onnx_model = onnx.load(str(result.onnx_path))
    ops = {n.op_type for n in onnx_model.graph.node}
    assert {"Sign", "NonMaxSuppression", "TopK"} <= ops
    assert ("RoiAlign" in ops) == (detector != "retinanet")
    assert all(n.domain in ("", "ai.onnx") for n in onnx_model.graph.node)


@pytest.mark.slow
def test_dynamic_batch_export(tmp_path: Path) -> None:
    result = export_model("sr_tod", tmp_path, overrides={**SMALL, "batch": "dynamic", "model": RPN}, log=quiet)
    assert result.verification.ok and result.verification.inputs == 6
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        num_dets, boxes, _, _ = sess.run(None, {"images": np.random.rand(n, 3, 256, 256).astype(np.float32) * 255})
        assert num_dets.shape == (n,) and boxes.shape == (n, 100, 4)
