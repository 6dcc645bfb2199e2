"""Loading upstream-layout checkpoints, and refusing the wrong ones with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tod_deploy.errors import UserError
from tod_deploy.models import build_deploy_model, build_training_model
from tod_deploy.recipes import load_recipe

RECIPE = {"input_size": "256x256"}


def quiet(_line: str) -> None:
    pass


def upstream_checkpoint(path: Path, seed: int, **overrides: object) -> dict[str, torch.Tensor]:
    """A checkpoint as the ThumbDet fork saves it: {'model': student state dict, top-level names}."""
    recipe = load_recipe("thumbdet", overrides={**RECIPE, **overrides})
    model, _ = build_training_model(recipe, None, seed=seed, log=quiet)
    state = model.student.state_dict()
    torch.save({"model": state, "epoch": 49}, path)
    return state


def test_upstream_checkpoint_loads_and_gives_its_outputs(tmp_path: Path) -> None:
    ckpt = tmp_path / "thumbdet.pth"
    state = upstream_checkpoint(ckpt, seed=7)
    recipe = load_recipe("thumbdet", overrides=RECIPE)
    lines: list[str] = []
    deploy, info = build_deploy_model(recipe, ckpt, seed=0, log=lines.append)
    assert info.source == "checkpoint" and len(info.sha256) == 64
    assert any("loaded" in line for line in lines)
    assert any("missing" in line and "teacher." in line for line in lines)  # teacher is training-only
    # Same weights as the seed-7 model, not the seed-0 init.
    reference, _ = build_deploy_model(recipe, None, seed=7, log=quiet)
    other, _ = build_deploy_model(recipe, None, seed=0, log=quiet)
    images = torch.rand(1, 3, 256, 256) * 255
    with torch.no_grad():
        got, want, differ = deploy.raw(images)[0], reference.raw(images)[0], other.raw(images)[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, differ)
    assert torch.equal(deploy.detector.query_embed.weight, state["query_embed.weight"])


def test_teacher_keys_in_checkpoint_are_reported_as_training_only(tmp_path: Path) -> None:
    recipe = load_recipe("thumbdet", overrides=RECIPE)
    model, _ = build_training_model(recipe, None, log=quiet)
    state = {**model.student.state_dict(), **{f"teacher.{k}": v for k, v in model.teacher.state_dict().items()}}
    state["module.extra_head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "full.pth")
    lines: list[str] = []
    with pytest.raises(UserError, match=r"1 keys of no part of thumbdet \(e\.g\. extra_head\.weight\)"):
        build_deploy_model(recipe, tmp_path / "full.pth", log=lines.append)
    del state["module.extra_head.weight"]
    torch.save(state, tmp_path / "full.pth")
    build_deploy_model(recipe, tmp_path / "full.pth", log=lines.append)
    assert not any("missing" in line for line in lines)
    assert any("training-only and left out of the deploy graph: teacher." in line for line in lines)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        build_deploy_model(load_recipe("thumbdet", overrides=RECIPE), tmp_path / "nope.pth", log=quiet)


def test_corrupt_checkpoint_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        build_deploy_model(load_recipe("thumbdet", overrides=RECIPE), bad, log=quiet)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "head.w": torch.zeros(2)}},
               tmp_path / "other.pth")  # fmt: skip
    with pytest.raises(UserError, match=r"lacks \d+ of the \d+ tensors thumbdet needs"):
        build_deploy_model(load_recipe("thumbdet", overrides=RECIPE), tmp_path / "other.pth", log=quiet)


def test_class_count_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    upstream_checkpoint(tmp_path / "c80.pth", seed=1, model={"num_classes": 80})
    with pytest.raises(UserError, match=r"class_embed\.\d\.weight has shape \(80, 256\), the model needs \(91, 256\)"):
        build_deploy_model(load_recipe("thumbdet", overrides=RECIPE), tmp_path / "c80.pth", log=quiet)
