"""Checkpoints as each paper's trainer writes them, exported as a user would, and malicious pickles.

Each file is built the way its trainer saves it (read from the trainers' code):
- Deformable-DETR's ``main.py`` (ThumbDet): ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}``,
  ``args`` an ``argparse.Namespace``;
- mmengine's ``Runner.save_checkpoint`` (SR-TOD, mmdet 3): ``{'meta', 'state_dict', 'message_hub',
  'optimizer', 'param_schedulers'}``, meta with ``cfg`` (the config's pretty text) and ``dataset_meta``,
  the message hub holding ``HistoryBuffer`` objects, and the EMA hook's ``ema_state_dict``;
- mmcv 1.x's ``save_checkpoint`` (CFINet, bottom-heavy, DFR-Det's mmdet 2 relatives): ``{'meta',
  'state_dict', 'optimizer'}`` with ``CLASSES``, ``config``, versions; DataParallel's ``module.``
  prefix; mmcv's EMA hook buffers ``ema_*``.
Trainer classes are defined under their upstream module names only while saving and removed before
loading, as on a machine where neither mmengine nor the trainer is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_cli import assert_one_line_error, run

from tod_deploy.errors import UserError
from tod_deploy.evaluation.coco_eval import category_lookup
from tod_deploy.export.pipeline import export_model
from tod_deploy.models import build_training_model
from tod_deploy.recipes import load_recipe

MMDET3_CFG = """\
model = dict(
    type='FasterRCNN',
    rpn_head=dict(
        type='RPNHead',
        anchor_generator=dict(
            type='AnchorGenerator', scales=[4], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64])),
    roi_head=dict(type='StandardRoIHead', bbox_head=dict(type='Shared2FCBBoxHead', num_classes=3)),
    test_cfg=dict(
        rpn=dict(nms_pre=600, max_per_img=500, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.3, nms=dict(type='nms', iou_threshold=0.6), max_per_img=200)))
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(800, 800), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
test_dataloader = dict(
    batch_size=1,
    dataset=dict(type='AITODDataset', metainfo=dict(classes=('plane', 'ship', 'vehicle')), pipeline=test_pipeline))
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1))
custom_hooks = [dict(type='EMAHook', momentum=0.0002)]
"""


def quiet(_line: str) -> None:
    pass


@contextmanager
def trainer_classes(**classes: str) -> Iterator[dict[str, type]]:
    """Classes under their upstream module names (e.g. HistoryBuffer in mmengine.logging.history_buffer)
    while a checkpoint is saved; gone afterwards, as where the trainer is not installed."""
    made, added = {}, []
    for name, module_name in classes.items():
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            package = ".".join(parts[:i])
            if package not in sys.modules:
                sys.modules[package] = types.ModuleType(package)
                added.append(package)
        cls = type(name, (), {"__module__": module_name})
        setattr(sys.modules[module_name], name, cls)
        made[name] = cls
    try:
        yield made
    finally:
        for package in added:
            del sys.modules[package]


def history_buffer(cls: type, values: list[float]) -> Any:
    buffer = cls()
    buffer._log_history, buffer._count_history, buffer.max_length = np.array(values), np.ones(len(values)), 1000000
    return buffer


def save_mmengine(path: Path, state_dict: dict[str, torch.Tensor], cfg_text: str, classes: tuple[str, ...]) -> None:
    """mmengine Runner.save_checkpoint with the EMAHook: weights in 'state_dict', the other copy in 'ema_state_dict'."""
    with trainer_classes(HistoryBuffer="mmengine.logging.history_buffer") as made:
        hub = {
            "log_scalars": {"train/loss": history_buffer(made["HistoryBuffer"], [1.2, 0.9]),
                            "train/lr": history_buffer(made["HistoryBuffer"], [0.02, 0.02])},
            "runtime_info": {"epoch": 12, "iter": 9000, "dataset_meta": {"classes": classes}},
            "resumed_keys": {"epoch": True},
        }  # fmt: skip
        meta = {"epoch": 12, "iter": 9000, "cfg": cfg_text, "seed": 42, "experiment_name": "sr_tod_aitod",
                "time": "20261201_101010", "mmengine_version": "0.10.7",
                "dataset_meta": {"classes": classes}}  # fmt: skip
        ema = {f"module.{k}": v.clone() for k, v in state_dict.items()} | {"steps": torch.tensor(9000)}
        torch.save({"meta": meta, "state_dict": state_dict, "message_hub": hub, "ema_state_dict": ema,
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "momentum": 0.9, "params": [0, 1]}]},
                    "param_schedulers": [{"start_factor": 0.001, "last_step": 9000}]}, path)  # fmt: skip


def save_mmcv(path: Path, state_dict: dict[str, torch.Tensor], classes: tuple[str, ...], config: str = "") -> None:
    """mmcv 1.x save_checkpoint as mmdet 2's train script calls it (meta with CLASSES, config, versions)."""
    meta = {"env_info": "sys.platform: linux", "config": config, "seed": 0, "exp_name": "faster_rcnn.py",
            "mmdet_version": "2.25.1", "mmcv_version": "1.7.1", "CLASSES": classes, "epoch": 12, "iter": 12000,
            "time": "Tue Dec  1 10:10:10 2026", "hook_msgs": {"last_ckpt": "work_dirs/epoch_12.pth"}}  # fmt: skip
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(2)}}, "param_groups": [{"lr": 0.01, "params": [0]}]}
    torch.save({"meta": meta, "state_dict": state_dict, "optimizer": optimizer}, path)


def trained_state(method: str, overrides: dict[str, Any], seed: int = 3) -> dict[str, torch.Tensor]:
    model, _ = build_training_model(load_recipe(method, overrides=overrides), None, seed=seed, log=quiet)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_deformable_detr_trainer_checkpoint(tmp_path: Path) -> None:
    """ThumbDet: a 20-class run; the export takes 20 classes from class_embed without being told."""
    model, _ = build_training_model(load_recipe("thumbdet", overrides={"input_size": "256x384", "model": {
        "num_classes": 20}}), None, seed=5, log=quiet)  # fmt: skip
    args = argparse.Namespace(lr=2e-4, lr_backbone=2e-5, batch_size=2, epochs=50, num_queries=300, two_stage=False,
                              dataset_file="coco", coco_path="data/coco", output_dir="exps/thumbdet")  # fmt: skip
    torch.save({"model": model.student.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"step_size": 40, "last_epoch": 49}, "epoch": 49, "args": args},
               tmp_path / "checkpoint0049.pth")  # fmt: skip
    lines: list[str] = []
    result = export_model("thumbdet", tmp_path / "out", tmp_path / "checkpoint0049.pth",
                          overrides={"input_size": "256x384"}, log=lines.append)  # fmt: skip
    assert result.verification.ok, result.verification.failure()
    settings = result.sidecar["settings"]
    assert settings["model.num_classes"] == {"value": 20, "from": "checkpoint (class_embed.0.weight shape)"}
    assert settings["input_size"]["from"] == "flag"
    assert result.sidecar["recipe"]["model"]["num_classes"] == 20
    text = "\n".join(lines)
    assert "deformable-detr format" in text and "argparse.Namespace" in text and "teacher." in text


@pytest.fixture(scope="module")
def sr_tod_mmengine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[str]]:
    folder = tmp_path_factory.mktemp("mmengine")
    state = trained_state("sr_tod", {"input_size": "256x256", "model": {"num_classes": 3}})
    # As in a trained RPN (a 20-minute SR-TOD run showed it): where no feature fires, every anchor scores
    # exactly its bias, and the features that do fire mostly say "background". So the proposals hold
    # plateaus of exactly tied scores, which each runtime's NMS breaks its own way.
    state["rpn_head.rpn_conv.bias"] -= 20.0
    state["rpn_head.rpn_cls.weight"] = -state["rpn_head.rpn_cls.weight"].abs()
    save_mmengine(folder / "epoch_12.pth", state, MMDET3_CFG, ("plane", "ship", "vehicle"))
    lines: list[str] = []
    result = export_model("sr_tod", folder / "out", folder / "epoch_12.pth", overrides={"input_size": "256x256"},
                          log=lines.append)  # fmt: skip
    return folder, result, lines


def test_mmengine_checkpoint_with_trainer_objects(sr_tod_mmengine: tuple[Path, Any, list[str]]) -> None:
    _, result, lines = sr_tod_mmengine
    assert "mmengine" not in sys.modules
    assert result.verification.ok, result.verification.failure()
    recipe, settings = result.sidecar["recipe"], result.sidecar["settings"]
    assert recipe["classes"] == ["plane", "ship", "vehicle"] and recipe["model"]["num_classes"] == 3
    assert settings["model.num_classes"]["from"] == "checkpoint (roi_head.bbox_head.fc_cls.weight shape)"
    # Test settings from the training config, read as data: rcnn score/NMS/max, RPN proposals.
    assert (recipe["score_threshold"], recipe["top_k"]) == (0.3, 200)
    assert (recipe["model"]["nms_iou"], recipe["model"]["rpn_max_per_img"], recipe["model"]["rpn_nms_pre"]) == (
        0.6, 500, 600)  # fmt: skip
    assert settings["top_k"]["from"].startswith("checkpoint config")
    assert settings["input_size"] == {"value": [256, 256], "from": "flag"}  # flags win over the config's 800
    text = "\n".join(lines)
    assert "mmengine format" in text and "mmengine.logging.history_buffer.HistoryBuffer" in text
    assert "ema_state_dict" in text and "setting top_k = 200 (from the checkpoint config" in text


def test_exactly_tied_proposals_of_a_trained_rpn_verify(sr_tod_mmengine: tuple[Path, Any, list[str]]) -> None:
    _, result, _ = sr_tod_mmengine
    (proposals,) = [s for s in result.verification.selections if s.name == "proposals"]
    # More NMS near-ties than the 1 % an export may have, excused because the reference ties them exactly.
    assert proposals.tied > 0 and proposals.near_ties > proposals.checked // 100
    assert proposals.ok and result.verification.ok, result.verification.failure()


def test_flags_win_over_the_checkpoint(tmp_path: Path, sr_tod_mmengine: tuple[Path, Any, list[str]]) -> None:
    folder, _, _ = sr_tod_mmengine
    names = tmp_path / "names.txt"
    names.write_text("# my labels\nairplane\nboat\ncar\n")
    flags = {"input_size": "256x256", "top_k": 50, "classes": ["airplane", "boat", "car"]}
    result = export_model("sr_tod", tmp_path, folder / "epoch_12.pth", verify=False, log=quiet, overrides=flags)
    assert result.sidecar["recipe"]["top_k"] == 50 and result.sidecar["settings"]["top_k"]["from"] == "flag"
    assert result.sidecar["recipe"]["classes"] == ["airplane", "boat", "car"]
    with pytest.raises(UserError, match=r"roi_head\.bbox_head\.fc_cls\.weight has shape \(4, 1024\), the model needs"):
        export_model("sr_tod", tmp_path, folder / "epoch_12.pth", verify=False, log=quiet,
                     overrides={"input_size": "256x256", "model": {"num_classes": 5}, "classes": []})  # fmt: skip


def test_eval_matches_categories_by_name() -> None:
    categories = [{"id": 7, "name": "ship"}, {"id": 9, "name": "plane"}]
    to_category = category_lookup(3, categories, False, ["plane", "ship", "vehicle"])
    assert [to_category(label) for label in range(3)] == [9, 7, None]
    with pytest.raises(UserError, match="none of the model's classes"):
        category_lookup(2, [{"id": 1, "name": "person"}], False, ["plane", "ship"])
    assert category_lookup(1, [{"id": 1, "name": "person"}], False, [])(0) == 1  # no names: by count


@pytest.mark.parametrize("method,overrides,key", [
    ("cfinet", {"input_size": "256x256", "top_k": 100, "model": {"num_classes": 4}},
     "roi_head.bbox_head.fc_cls.weight"),
    pytest.param("bh", {"input_size": "256x256", "model": {"num_classes": 2}}, "roi_head.bbox_head.fc_cls.weight",
                 marks=pytest.mark.slow),  # mmcv layout and fc_cls as CFINet's; test_bh_sspnet loads a BH one
    ("dfr_det", {"input_size": "128x128", "model": {"num_classes": 2}}, "bbox_head.conv_cls.weight"),
])  # fmt: skip
def test_mmcv_checkpoints_export_with_parity(
    tmp_path: Path, method: str, overrides: dict[str, Any], key: str
) -> None:
    """mmcv 1.x format with DataParallel's prefix and (DFR-Det) mmcv EMA buffers; classes from meta.CLASSES."""
    state = trained_state(method, overrides)
    count = overrides["model"]["num_classes"]
    classes = tuple(f"class{i}" for i in range(count))
    saved = {f"module.{k}": v for k, v in state.items()}
    if method == "dfr_det":
        saved |= {"ema_" + k.replace(".", "_"): v.clone() for k, v in list(state.items())[:5] if v.is_floating_point()}
    save_mmcv(tmp_path / "epoch_12.pth", saved, classes)
    flags = {k: v for k, v in overrides.items() if k != "model"}
    lines: list[str] = []
    result = export_model(method, tmp_path / "out", tmp_path / "epoch_12.pth", overrides=flags, log=lines.append)
    assert result.verification.ok, result.verification.failure()
    assert result.sidecar["recipe"]["classes"] == list(classes)
    assert result.sidecar["settings"]["model.num_classes"] == {"value": count, "from": f"checkpoint ({key} shape)"}
    text = "\n".join(lines)
    assert "mmcv format" in text and "not used: meta, optimizer" in text
    if method == "dfr_det":
        assert "ignored 5 EMA copies" in text and "decoder." in text
    if method == "cfinet":
        assert "training-only and left out of the deploy graph: roi_head.fc_enc" in text


def test_a_key_of_no_known_part_is_refused(tmp_path: Path) -> None:
    state = trained_state("sr_tod", {"input_size": "256x256"})
    state["roi_head.mask_head.conv_logits.weight"] = torch.zeros(8, 256, 1, 1)
    save_mmcv(tmp_path / "mask.pth", state, tuple(f"c{i}" for i in range(8)))
    with pytest.raises(UserError, match=r"1 keys of no part of sr_tod \(e\.g\. roi_head\.mask_head\.conv_logits"):
        build_training_model(load_recipe("sr_tod", overrides={"input_size": "256x256"}), tmp_path / "mask.pth",
                             log=quiet)  # fmt: skip


class Payload:
    """What an attacker pickles: unpickling calls os.system (here: create a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


class BuiltinPayload(Payload):
    def __reduce__(self) -> tuple[Any, ...]:
        import builtins

        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload,global_name", [(Payload, "posix.system"), (BuiltinPayload, "builtins.exec")])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, payload: type, global_name: str) -> None:
    marker = tmp_path / "MARKER"
    state = {"backbone.conv1.weight": torch.zeros(1)}
    torch.save({"meta": {"note": payload(marker)}, "state_dict": state}, tmp_path / "evil.pth")
    result = run("export", "--method", "sr_tod", "--checkpoint", str(tmp_path / "evil.pth"), "--output",
                 str(tmp_path / "out"))  # fmt: skip
    assert_one_line_error(result, f"evil.pth calls {global_name} while loading")
    assert "\x1b[" not in result.stderr  # no ANSI escapes in error lines
    assert "nothing it asked for was run" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_sidecar_settings_are_json(sr_tod_mmengine: tuple[Path, Any, list[str]]) -> None:
    _, result, _ = sr_tod_mmengine
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["settings"]["score_threshold"]["value"] == 0.3


def test_names_from_the_file_cannot_reach_the_terminal_raw(tmp_path: Path) -> None:
    """A global's name is text of the pickle's choosing: an escape sequence in it is shown escaped."""
    import zipfile

    pickle_bytes = b"\x80\x02c\x1b[31mevil\nthing\n)R."  # GLOBAL '<ESC>[31mevil thing', call it with ()
    with zipfile.ZipFile(tmp_path / "ansi.pth", "w") as archive:  # torch's zip layout
        archive.writestr("ansi/data.pkl", pickle_bytes)
        archive.writestr("ansi/byteorder", "little")
        archive.writestr("ansi/version", "3\n")
    with pytest.raises(UserError) as caught:
        build_training_model(load_recipe("sr_tod", overrides={"input_size": "256x256"}), tmp_path / "ansi.pth",
                             log=quiet)  # fmt: skip
    assert "\x1b" not in caught.value.line() and "\\x1b[31mevil" in caught.value.line()
