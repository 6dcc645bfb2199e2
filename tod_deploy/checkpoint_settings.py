"""An export's settings from three sources: the method's recipe, the user's checkpoint, and flags.

A trained checkpoint says things the recipe cannot know: how many classes the user trained (the
shape of the classifier), their names (mmcv ``meta.CLASSES``, mmengine ``meta.dataset_meta``), and
the test settings of its training config (``meta.config`` / ``meta.cfg``, read as data by
``upstream_config``). Flags win over the checkpoint, the checkpoint over the recipe; where each
setting came from is printed and kept in the sidecar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tod_deploy.checkpoints import TrainingCheckpoint, read_checkpoint
from tod_deploy.errors import UserError
from tod_deploy.recipes import Recipe, deep_merge, load_recipe
from tod_deploy.registry import get_method
from tod_deploy.upstream_config import ConfigTextError, parse_config_text, test_settings

FLAG, CHECKPOINT, RECIPE = "flag", "checkpoint", "recipe"


def _rows(key: str, minus: int = 0) -> Callable[[Mapping[str, torch.Tensor]], int]:
    return lambda sd: int(sd[key].shape[0]) - minus


def _retina_classes(sd: Mapping[str, torch.Tensor]) -> int:
    anchors = int(sd["bbox_head.retina_reg.weight"].shape[0]) // 4
    return int(sd["bbox_head.retina_cls.weight"].shape[0]) // anchors


# Upstream classifier tensors and how each says the class count (mmdet heads keep a background
# row in softmax R-CNN classifiers; RetinaNet has one row per anchor and class; DETR and FCOS one per class).
CLASS_TENSORS: dict[str, Callable[[Mapping[str, torch.Tensor]], int]] = {
    "class_embed.0.weight": _rows("class_embed.0.weight"),
    "roi_head.bbox_head.fc_cls.weight": _rows("roi_head.bbox_head.fc_cls.weight", 1),
    "roi_head.bbox_head.0.fc_cls.weight": _rows("roi_head.bbox_head.0.fc_cls.weight", 1),
    "bbox_head.retina_cls.weight": _retina_classes,
    "bbox_head.conv_cls.weight": _rows("bbox_head.conv_cls.weight"),
}


def classes_in(state_dict: Mapping[str, torch.Tensor], keys: tuple[str, ...]) -> tuple[int, str] | None:
    """The class count the first of the method's classifier tensors present says, and that key."""
    for key in keys:
        if key in state_dict:
            return CLASS_TENSORS[key](state_dict), key
    return None


# Config-file test settings -> recipe keys (top level or "model.<key>"), used where the method's
# recipe has that key. ``test_size`` is (H, W).
CONFIG_TO_RECIPE = {
    "score_threshold": "score_threshold",
    "max_per_img": "top_k",
    "test_size": "input_size",
    "nms_iou": "model.nms_iou",
    "rpn_max_per_img": "model.rpn_max_per_img",
    "rpn_nms_pre": "model.rpn_nms_pre",
    "rpn_iou": "model.rpn_iou",
    "nms_pre": "model.nms_pre",
    "anchor_scale": "model.anchor_scale",
    "anchor_ratios": "model.anchor_ratios",
    "nms_type_soft": "model.nms_type",
    "soft_nms_min_score": "model.soft_nms_min_score",
    "soft_nms_method": "model.soft_nms_method",
    "soft_nms_sigma": "model.soft_nms_sigma",
}
# The config's soft-NMS settings under the names _applicable gives them (then CONFIG_TO_RECIPE).
SOFT_NMS_KEYS = {
    "nms_type": "nms_type_soft",
    "min_score": "soft_nms_min_score",
    "nms_method": "soft_nms_method",
    "nms_sigma": "soft_nms_sigma",
}


@dataclass
class ResolvedRecipe:
    """The recipe an export uses and, for each setting a flag or the checkpoint gave, where it came from."""

    recipe: Recipe
    sources: dict[str, str] = field(default_factory=dict)  # "top_k" / "model.num_classes" -> source
    skipped_config: list[str] = field(default_factory=list)  # config assignments not read (not plain data)

    def lines(self) -> list[str]:
        """What the user reads: each setting not from the recipe, and its source."""
        out = []
        for key, source in sorted(self.sources.items()):
            if source != RECIPE:
                out.append(f"setting {key} = {_show(key, _lookup(self.recipe, key))} (from the {source})")
        if self.skipped_config:
            shown = ", ".join(self.skipped_config[:5]) + (", ..." if len(self.skipped_config) > 5 else "")
            out.append(f"checkpoint config: not plain data, not read (never run): {shown}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {key: {"value": _lookup(self.recipe, key), "from": src} for key, src in sorted(self.sources.items())}


def _show(key: str, value: Any) -> str:
    return "x".join(map(str, value)) if key == "input_size" else str(value)


def _lookup(recipe: Recipe, key: str) -> Any:
    if key.startswith("model."):
        return recipe.model.get(key.removeprefix("model."))
    value = getattr(recipe, key)
    return list(value) if isinstance(value, tuple) else value


def _set(overrides: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith("model."):
        overrides.setdefault("model", {})[key.removeprefix("model.")] = value
    else:
        overrides[key] = value


def _flag_keys(flags: Mapping[str, Any]) -> set[str]:
    return {f"model.{k}" for k in flags.get("model", {})} | {k for k in flags if k != "model"}


def from_checkpoint(
    recipe: Recipe, checkpoint: TrainingCheckpoint, class_tensors: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Overrides the checkpoint implies, their sources, and the config assignments skipped."""
    overrides: dict[str, Any] = {}
    sources: dict[str, str] = {}
    skipped: list[str] = []
    text = checkpoint.config_text()
    config: dict[str, Any] = {}
    if text:
        try:
            parsed = parse_config_text(text)
        except ConfigTextError as exc:
            skipped = [f"the whole config ({exc})"]
        else:
            skipped = parsed.skipped_names
            config = test_settings(parsed)
        config = _applicable(config, recipe)
        for name, value in config.items():
            key = CONFIG_TO_RECIPE.get(name)
            if key is None or _lookup(recipe, key) is None and key.startswith("model."):
                continue  # a setting this method's recipe does not have
            if key == "input_size":
                value = [_round_up(int(v), recipe.size_divisor) for v in value]
            _set(overrides, key, value)
            sources[key] = f"{CHECKPOINT} config ({checkpoint.path.name})"
    found = classes_in(checkpoint.state_dict, class_tensors)
    if found is not None:
        count, key = found
        _set(overrides, "model.num_classes", count)
        sources["model.num_classes"] = f"{CHECKPOINT} ({key} shape)"
    names, where = checkpoint.class_names(), "meta"
    if not names and isinstance(config.get("classes"), list | tuple):
        names, where = [str(n) for n in config["classes"]], "config"
    if names:
        overrides["classes"] = list(names)
        sources["classes"] = f"{CHECKPOINT} {where}"
    return overrides, sources, skipped


def _applicable(config: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """What of the config maps onto this recipe's keys with the same meaning.

    A soft-NMS IoU is no hard-NMS threshold: soft-NMS settings apply where the recipe has soft-NMS
    (``model.nms_type``), else the IoU is dropped. One anchor scale is ``anchor_scale``; several
    apply where the recipe takes an anchor list (``model.anchor_ratios``). Several test scales
    (multi-scale testing) leave the recipe's single size.
    """
    applicable = dict(config)
    soft = applicable.get("nms_type", "nms") == "soft_nms"
    if soft and "nms_type" in recipe.model:
        for name in ("nms_type", "min_score", "nms_method", "nms_sigma"):
            if name in applicable:
                applicable[SOFT_NMS_KEYS[name]] = applicable.pop(name)
    elif applicable.get("nms_type", "nms") != "nms":
        applicable.pop("nms_iou", None)
    scales = applicable.get("anchor_scales")
    if isinstance(scales, list) and (len(scales) == 1 or "anchor_ratios" in recipe.model):
        applicable["anchor_scale"] = scales[0] if len(scales) == 1 else scales
    return applicable


def _round_up(value: int, divisor: int) -> int:
    return -(-value // max(divisor, 1)) * max(divisor, 1)


def read_class_names(path: Path) -> list[str]:
    """``--classes names.txt``: one class name per line (blank lines and # comments skipped)."""
    if not path.is_file():
        raise UserError(f"class names file {path} does not exist", "pass a text file with one class name per line")
    names = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise UserError(f"class names file {path} lists no names", "write one class name per line")
    return names


def resolve_recipe_with_checkpoint(
    method: str, variant: str | None, flags: Mapping[str, Any] | None, checkpoint: Path | None
) -> ResolvedRecipe:
    """recipe < checkpoint < flags, with each setting's source."""
    spec = get_method(method)
    flags = dict(flags or {})
    sources = dict.fromkeys(_flag_keys(flags), FLAG)
    if checkpoint is None:
        return ResolvedRecipe(load_recipe(method, variant, flags), sources)
    # The recipe's own keys decide which checkpoint settings apply; names are checked once merged.
    base = load_recipe(method, variant, {key: value for key, value in flags.items() if key != "classes"})
    training = read_checkpoint(checkpoint)
    implied, implied_sources, skipped = from_checkpoint(base, training, spec.class_tensors)
    recipe = load_recipe(method, variant, deep_merge(implied, flags))
    for key, source in implied_sources.items():
        sources.setdefault(key, source)
    return ResolvedRecipe(recipe, sources, skipped)
