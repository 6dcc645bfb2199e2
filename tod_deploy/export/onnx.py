"""torch.onnx.export (dynamo path) of a deploy model's export view.

Spatial size is fixed per export (recipe ``input_size``) so position embeddings and reference
points fold into constants; only the batch axis may be dynamic.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch

from tod_deploy.methods.base import DeployModel, ExportView, traced_names
from tod_deploy.nn.binary import BinaryConv2d
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
from tod_deploy.ops.binary_conv_onnx import finalize, prepare_for_export, translation_table
from tod_deploy.parity.decisions import name_decision_nodes
from tod_deploy.parity.forcing import named_modules_at_export
from tod_deploy.recipes import Recipe

INPUT_NAME = "images"


def example_images(recipe: Recipe, batch: int = 1, seed: int = 0) -> torch.Tensor:
    h, w = recipe.input_size
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255.0


def kept_outputs(model: DeployModel, raw_only: bool, extras: tuple[str, ...] = ()) -> list[str]:
    """The outputs the written file keeps: the contract (or the raw head outputs), then extras."""
    base = list(model.raw_names) if raw_only else list(CONTRACT_OUTPUTS)
    return list(dict.fromkeys([*base, *extras]))


def export_to_onnx(model: DeployModel, recipe: Recipe) -> onnx.ModelProto:
    """Export every traced tensor as an output; the passes then keep what the user asked for."""
    view: torch.nn.Module = ExportView(model).eval()
    binary = any(isinstance(m, BinaryConv2d) for m in model.modules())
    if binary:  # 1-bit layers become tod::BinaryConv2d nodes or their standard-op decomposition
        view = prepare_for_export(view, recipe.binary_conv).eval()
    batch = 2 if recipe.batch == "dynamic" else int(recipe.batch)
    images = example_images(recipe, batch)
    dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1, max=64)}} if recipe.batch == "dynamic" else None
    # The exporter narrates every pass and warns about folding it skips: keep the CLI quiet.
    noisy = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        with (
            torch.no_grad(),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                view,
                (images,),
                dynamo=True,
                opset_version=recipe.opset,
                input_names=[INPUT_NAME],
                output_names=traced_names(model),
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table() if binary else None,
                optimize=True,
                verbose=False,
            )
    finally:
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)
    proto = program.model_proto
    name_decision_nodes(proto, named_modules_at_export(model))
    return finalize(proto, recipe.binary_conv) if binary else proto
