"""Export recipes: what to build and how to export it, read from ``export_recipes/<method>.yaml``.

A recipe is the single source of an export's settings, so the sidecar can record it and
``verify``/``bench`` can rebuild the same PyTorch model later. Unknown keys are refused: a typo
in a recipe must not silently fall back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tod_deploy.errors import UserError

BINARY_CONV_MODES = ("plugin", "plugin-unfused", "decompose")  # see tod_deploy.ops.binary_conv_onnx


@dataclass
class Recipe:
    method: str
    description: str = ""
    input_size: tuple[int, int] = (800, 800)  # (H, W)
    size_divisor: int = 1
    min_size: int = 32
    top_k: int = 100
    score_threshold: float = 0.0
    opset: int = 18
    batch: str = "1"  # "1".."N" fixed, or "dynamic"
    # 1-bit layers as tod::BinaryConv2d nodes with the Add/PRelu behind them fused ("plugin"), without that
    # fusion ("plugin-unfused"), or as standard ops ("decompose")
    binary_conv: str = "plugin"
    model: dict[str, Any] = field(default_factory=dict)
    # Class names by label index, where known (from the checkpoint's metadata or --classes).
    classes: list[str] = field(default_factory=list)
    variant: str = ""
    default_variant: str = ""  # the variant the top-level settings already are (not named in file stems)
    # The paper's own figures for this configuration, so `inspect` can show the deviation.
    paper: dict[str, Any] = field(default_factory=dict)

    def stem(self) -> str:
        """File stem of an export: method, then non-default variant, then detector if any."""
        parts = [self.method]
        if self.variant and self.variant != self.default_variant:
            parts.append(self.variant)
        if "detector" in self.model:
            parts.append(str(self.model["detector"]))
        return "_".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"recipe has unknown keys {unknown}", f"allowed keys are {sorted(known)}")
        data = dict(data)
        if "input_size" in data:
            data["input_size"] = parse_input_size(data["input_size"])
        recipe = cls(**data)
        recipe.validate()
        return recipe

    def validate(self) -> None:
        if self.top_k <= 0:
            raise UserError(f"top_k must be positive, got {self.top_k}", "set top_k to e.g. 100 in the recipe")
        if self.opset < 17:
            raise UserError(f"opset {self.opset} is too old", "use --opset 17 or newer (GridSample, LayerNorm)")
        if self.binary_conv not in BINARY_CONV_MODES:
            raise UserError(
                f"unknown binary-conv mode {self.binary_conv!r}", f"use --binary-conv {' or '.join(BINARY_CONV_MODES)}"
            )
        if self.batch != "dynamic" and not (self.batch.isdigit() and int(self.batch) > 0):
            raise UserError(f"batch must be a positive integer or 'dynamic', got {self.batch!r}", "use --batch 1")
        count = self.model.get("num_classes")
        if self.classes and count is not None and len(self.classes) != int(count):
            raise UserError(
                f"{len(self.classes)} class names given for a model of {count} classes",
                "pass --classes with one name per class, in label order, or --num-classes to match",
            )
        h, w = self.input_size
        d = self.size_divisor
        if h < self.min_size or w < self.min_size:
            raise UserError(
                f"input size {h}x{w} is below this model's minimum of {self.min_size} px per side",
                f"use --input-size of at least {self.min_size}x{self.min_size}",
            )
        if h % d or w % d:
            raise UserError(
                f"input size {h}x{w} is not divisible by {d}, which {self.method} needs",
                f"use e.g. --input-size {round_up(h, d)}x{round_up(w, d)}",
            )


def round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def parse_input_size(value: Any) -> tuple[int, int]:
    """Accept "800x1333", "800", [800, 1333] or (800, 1333) as (H, W)."""
    if isinstance(value, list | tuple) and len(value) == 2:
        h, w = value
    elif isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"cannot read input size {value!r}", "write it as HEIGHTxWIDTH, e.g. 800x1333")
        h, w = (int(p) for p in parts)
    else:
        raise UserError(f"cannot read input size {value!r}", "write it as HEIGHTxWIDTH, e.g. 800x1333")
    if int(h) <= 0 or int(w) <= 0:
        raise UserError(f"input size {value!r} must be positive", "write it as HEIGHTxWIDTH, e.g. 800x1333")
    return int(h), int(w)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, dicts merged key by key (recipe < variant < checkpoint < flags)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def recipe_dir() -> Path:
    return Path(__file__).resolve().parent / "export_recipes"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def load_recipe(
    method: str, variant: str | None = None, overrides: dict[str, Any] | None = None, path: Path | None = None
) -> Recipe:
    """Read a method's recipe, apply a named variant, then explicit overrides (CLI flags)."""
    if path is None:
        path = recipe_dir() / f"{method}.yaml"
        if not path.is_file():
            raise UserError(f"no recipe for method {method!r}", f"choose one of: {', '.join(available_recipes())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}", "fix the YAML syntax") from exc
    variants = data.pop("variants", {}) or {}
    if variant:
        if variant not in variants:
            raise UserError(
                f"recipe {method} has no variant {variant!r}", f"choose one of: {', '.join(sorted(variants))}"
            )
        data = deep_merge(data, variants[variant])
        data["variant"] = variant
    data = deep_merge(data, overrides or {})
    return Recipe.from_dict(data)
