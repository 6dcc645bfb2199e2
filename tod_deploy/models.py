"""Build a method's model with its weights, the same way for export, verify, bench and inspect."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tod_deploy.checkpoints import describe_checkpoint, read_checkpoint
from tod_deploy.methods.base import DeployModel, TrainingModel
from tod_deploy.recipes import Recipe
from tod_deploy.registry import get_method
from tod_deploy.weights import RANDOM_WEIGHTS_NOTICE, load_checkpoint, seeded_init, sha256_file


@dataclass
class WeightsInfo:
    source: str  # "checkpoint" or "seeded"
    seed: int
    checkpoint: str | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def resolve_recipe(
    method: str, variant: str | None = None, overrides: dict | None = None, checkpoint: Path | None = None
) -> Recipe:
    """The recipe of a known method, with what the checkpoint says (class count, names, test settings)
    under the flags (``overrides``); an unknown method is reported as such, not as a missing file."""
    from tod_deploy.checkpoint_settings import resolve_recipe_with_checkpoint

    return resolve_recipe_with_checkpoint(method, variant, overrides, checkpoint).recipe


def build_training_model(
    recipe: Recipe, checkpoint: Path | None, seed: int = 0, log: Callable[[str], None] = print
) -> tuple[TrainingModel, WeightsInfo]:
    spec = get_method(recipe.method)
    torch.manual_seed(seed)
    model = spec.build(recipe)
    seeded_init(model, seed)
    if checkpoint is None:
        log(RANDOM_WEIGHTS_NOTICE.format(seed=seed))
        return model, WeightsInfo("seeded", seed)
    report = load_checkpoint(model, checkpoint, spec)
    log(f"checkpoint: {describe_checkpoint(read_checkpoint(checkpoint))}")
    for line in report.lines():
        log(f"checkpoint: {line}")
    return model, WeightsInfo("checkpoint", seed, str(checkpoint.resolve()), sha256_file(checkpoint))


def build_deploy_model(
    recipe: Recipe, checkpoint: Path | None, seed: int = 0, log: Callable[[str], None] = print
) -> tuple[DeployModel, WeightsInfo]:
    model, info = build_training_model(recipe, checkpoint, seed, log)
    return model.deploy(recipe), info


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
