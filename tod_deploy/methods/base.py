"""What every method provides, so export/verify/bench/inspect never special-case a paper.

A deploy model takes ``images`` float32 [N, 3, H, W], RGB 0..255, and returns the fixed-size
detection contract. ``raw()`` exposes the head outputs before post-processing: they are what
parity is measured on (post-processing reorders, so comparing contracts alone hides errors),
and what a ``--raw`` export keeps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from torch import Tensor, nn

from tod_deploy.errors import UserError
from tod_deploy.nn.heads.rpn import SelectedProposals
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
from tod_deploy.recipes import Recipe


class DeployModel(nn.Module, ABC):
    """The inference view of a method.

    ``run`` computes every named tensor a deployment may want in one pass: the detection
    contract, the head outputs a ``--raw`` export keeps (``raw_names``), the dense pre-NMS
    tensors that parity is checked on element by element (``parity_names``: NMS and top-k may
    legitimately reorder near-ties, dense outputs may not differ), and optional extras
    (``extra_names``) a user can ask to keep beside the contract.
    """

    raw_names: tuple[str, ...] = ()
    parity_names: tuple[str, ...] = ()
    # Parity tensors in input pixels (e.g. decoded anchors): their rounding error scales with the image
    # extent, not with each coordinate, so parity gives them an absolute tolerance of a few float32 ulps
    # of that extent (export/verify.py PIXEL_ULPS), which matters for coordinates near 0.
    pixel_outputs: tuple[str, ...] = ()
    extra_names: tuple[str, ...] = ()
    nms_iou: float | None = None  # the final NMS threshold, if the graph has one (parity excuses its near-ties)
    # The threshold final scores are cut at, if not the recipe's (FCOS cuts class probabilities
    # before multiplying by centerness, so its final scores have no cut): parity skips boxes near it.
    final_score_threshold: float | None = None
    # Submodule path of the backbone alone, for ``inspect --backbone-only`` (None: no separate backbone).
    backbone_path: str | None = None

    @abstractmethod
    def run(self, images: Tensor) -> dict[str, Tensor]:
        """Contract outputs (``CONTRACT_OUTPUTS``) plus every raw / parity / extra tensor."""

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.run(images)
        return tuple(out[name] for name in CONTRACT_OUTPUTS)

    def raw(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.run(images)
        return tuple(out[name] for name in self.raw_names)

    def complexity_parts(self) -> dict[str, str]:
        """Display name -> submodule path, for the per-part breakdown of ``inspect``."""
        return {}

    def backbone_paper(self, input_size: tuple[int, int]) -> dict[str, Any]:
        """The paper's figures for the backbone alone at this input size, where it gives them."""
        return {}


def selection_names(model: nn.Module) -> list[str]:
    """Tensors a selection marker passes on (e.g. ``SelectedProposals``): named in an export so parity
    can compare the selection and teacher-force what follows it; never kept as outputs."""
    return [name for m in model.modules() if isinstance(m, SelectedProposals) for name in m.names]


def traced_names(model: DeployModel) -> list[str]:
    """Every tensor an export traces, each once: contract, raw, parity, extras, selections."""
    named = [*CONTRACT_OUTPUTS, *model.raw_names, *model.parity_names, *model.extra_names, *selection_names(model)]
    return list(dict.fromkeys(named))


class ExportView(nn.Module):
    """The graph that gets exported: every traced tensor as an output, so passes can name them;
    the written file keeps only the requested ones as outputs, the rest stay named inside."""

    def __init__(self, model: DeployModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model.run(images)
        return tuple(out[name] for name in traced_names(self.model))


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
    # Optional Callable[[set[str], nn.Module], None]: raise UserError when a checkpoint's keys show
    # it was trained with other layer options than the recipe's (before any tensor is loaded).
    check_checkpoint_keys: Any = None
    # Upstream classifier tensors whose shape says how many classes a checkpoint was trained with,
    # in the order looked for (checkpoint_settings.CLASS_TENSORS says how each is read).
    class_tensors: tuple[str, ...] = ()


Config = TypeVar("Config")


def model_config(cls: type[Config], recipe: Recipe) -> Config:
    """A method's config dataclass from the recipe's ``model`` section; unknown keys are refused."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(recipe.model) - known)
    if unknown:
        raise UserError(f"{recipe.method} recipe has unknown model keys {unknown}", f"allowed: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.model.items()})
