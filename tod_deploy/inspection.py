"""``inspect``: a deploy model's size and multiply-adds next to what its paper reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from tod_deploy.complexity import count_complexity
from tod_deploy.errors import UserError
from tod_deploy.methods.base import DeployModel
from tod_deploy.models import build_deploy_model, resolve_recipe
from tod_deploy.recipes import Recipe


def inspect_method(
    method: str,
    variant: str | None,
    overrides: dict[str, Any],
    checkpoint: Path | None,
    log: Callable[[str], None] = print,
    backbone_only: bool = False,
) -> dict[str, Any]:
    recipe = resolve_recipe(method, variant, overrides, checkpoint)
    deploy, _ = build_deploy_model(recipe, checkpoint, log=lambda _line: None)
    if backbone_only:
        return _backbone_only(deploy, recipe, method)
    parts = {label: path for label, path in deploy.complexity_parts().items()}
    result = count_complexity(deploy, recipe.input_size, parts).to_dict()
    result.update(method=method, variant=recipe.variant, description=recipe.description, paper=recipe.paper)
    return result


def _backbone_only(deploy: DeployModel, recipe: Recipe, method: str) -> dict[str, Any]:
    """The backbone's own parameters and multiply-adds (as backbone papers tabulate them)."""
    if deploy.backbone_path is None:
        raise UserError(f"{method} has no separate backbone to count", "drop --backbone-only")
    label = next((k for k, v in deploy.complexity_parts().items() if v == deploy.backbone_path), "backbone")
    counted = count_complexity(deploy, recipe.input_size, {label: deploy.backbone_path})
    part = counted.parts[label]
    return {
        "input_size": list(recipe.input_size),
        "parameters": part["parameters"],
        "macs": part["macs"],
        "gmacs": part["macs"] / 1e9,
        "parts": {label: part},
        "method": method,
        "variant": recipe.variant,
        "description": f"{recipe.description}: backbone only",
        "paper": deploy.backbone_paper(recipe.input_size),
    }


def _deviation(ours: float, theirs: float | None) -> str:
    return "" if not theirs else f"{(ours / theirs - 1) * 100:+.1f}%"


def inspect_table(result: dict[str, Any]) -> Table:
    h, w = result["input_size"]
    table = Table(title=f"{result['description']} at {h}x{w}")
    for column in ("part", "parameters (M)", "multiply-adds (G)", "paper", "deviation"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for label, part in result["parts"].items():
        table.add_row(label, f"{part['parameters'] / 1e6:.3f}", f"{part['macs'] / 1e9:.3f}", "", "")
    paper = result.get("paper") or {}
    same_size = list(paper.get("input_size", [])) == [h, w]
    params_m, gmacs = result["parameters"] / 1e6, result["gmacs"]
    table.add_row("total parameters", f"{params_m:.2f}", "", str(paper.get("params_m", "")),
                  _deviation(params_m, paper.get("params_m")))  # fmt: skip
    paper_gmacs = paper.get("gmacs") if same_size else None
    table.add_row("total multiply-adds", "", f"{gmacs:.2f}", str(paper_gmacs or ""), _deviation(gmacs, paper_gmacs))
    if result.get("binary_parameters") or "size_mb" in paper:
        size, gops = result["size_mb"], result["gops"]
        table.add_row("size (MB, 32/1-bit)", f"{size:.2f}", "", str(paper.get("size_mb", "")),
                      _deviation(size, paper.get("size_mb")))  # fmt: skip
        paper_gops = paper.get("gops") if same_size else None
        table.add_row(
            "OPs (G, real + binary/64)", "", f"{gops:.2f}", str(paper_gops or ""), _deviation(gops, paper_gops)
        )
    if paper and not same_size:
        table.caption = f"paper: {paper.get('gmacs')} G at {paper.get('input_size')} ({paper.get('source', '')})"
    elif paper.get("source"):
        table.caption = f"paper: {paper['source']}"
    return table
