"""What every method provides, so export/verify/bench/inspect never special-case a paper.

A deploy model takes ``images`` float32 [N, 3, H, W], RGB 0..255, and returns the fixed-size
detection contract. ``raw()`` exposes the head outputs before post-processing: they are what
parity is measured on (post-processing reorders, so comparing contracts alone hides errors),
and what a ``--raw`` export keeps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from tod_deploy.recipes import Recipe


class DeployModel(nn.Module, ABC):
    raw_names: tuple[str, ...] = ()

    @abstractmethod
    def raw(self, images: Tensor) -> tuple[Tensor, ...]:
        """Head outputs named by ``raw_names``."""

    @abstractmethod
    def postprocess(self, raw: tuple[Tensor, ...], image_hw: tuple[int, int]) -> tuple[Tensor, ...]:
        """(num_dets, boxes, scores, labels) from the raw outputs."""

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return self.postprocess(self.raw(images), (int(images.shape[-2]), int(images.shape[-1])))

    def complexity_parts(self) -> dict[str, str]:
        """Display name -> submodule path, for the per-part breakdown of ``inspect``."""
        return {}


class ExportView(nn.Module):
    """The graph that gets exported: contract outputs, then raw outputs (or raw alone).

    Raw outputs travel with the contract during export so that graph passes can name them;
    the written file keeps them only as named intermediate tensors that ``verify`` can expose.
    """

    def __init__(self, model: DeployModel, raw_only: bool) -> None:
        super().__init__()
        self.model = model
        self.raw_only = raw_only

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        raw = self.model.raw(images)
        if self.raw_only:
            return raw
        return (*self.model.postprocess(raw, (int(images.shape[-2]), int(images.shape[-1]))), *raw)


class TrainingModel(nn.Module, ABC):
    """A method's model as trained: holds training-only parts and computes the training losses."""

    @abstractmethod
    def deploy(self, recipe: Recipe) -> DeployModel:
        """The inference view: training-only parts gone, foldable parts folded, eval mode."""

    @abstractmethod
    def training_losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Every loss of the training form on one batch (images RGB 0..255)."""


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how to build a method and which checkpoint keys are training-only."""

    name: str
    summary: str
    build: Any  # Callable[[Recipe], TrainingModel]
    map_checkpoint_key: Any  # Callable[[str], str]: upstream key -> training-form key
    training_only_prefixes: tuple[str, ...]
