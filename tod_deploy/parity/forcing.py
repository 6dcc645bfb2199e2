"""Teacher forcing: PyTorch as the reference, taking the backend's side at every hard decision.

Why: where a value lies within rounding distance of a decision boundary (a threshold, a 1-bit
layer's input sign), two correct runtimes may decide differently, and in a 1-bit network one
flipped bit changes the next layer's sums by 2 at nine positions, which flips more bits: the
end-to-end outputs of a correct export diverge. So at each decision module (``ThresholdSign``,
``BinaryConv2d``) PyTorch records its own input and decision, then continues with the input the
backend saw; every later tensor is then compared on equal terms (a 1-bit layer whose node fused the
residual and activation behind it gets that epilogue applied, by the NumPy reference, to its own
output and the backend's residual), and the decision itself is
judged by decisions.judge (a flip is excused only within tolerance of the boundary). A selection
marker (``SelectedProposals``) is forced on its output instead: PyTorch's own proposals are
compared with the backend's by the selection rule, then the backend's go on to the RoI head.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from tod_deploy.errors import UserError
from tod_deploy.methods.base import DeployModel
from tod_deploy.nn.binary import BinaryConv2d
from tod_deploy.nn.binary_threshold import ThresholdSign
from tod_deploy.nn.heads.rpn import SelectedProposals
from tod_deploy.ops.binary_conv_ref import apply_epilogue
from tod_deploy.parity.decisions import DecisionRecord, DecisionSite, SelectionRecord

DECISION_MODULES = (BinaryConv2d, ThresholdSign)  # forced on their input
SELECTION_MODULES = (SelectedProposals,)  # forced on their output
Sink = Callable[[DecisionRecord | SelectionRecord], None]
REEXPORT = "re-export the file with this tod-deploy"


def decision_modules(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if isinstance(module, DECISION_MODULES)]


def named_modules_at_export(model: nn.Module) -> set[str]:
    """Modules whose ONNX nodes export names after them: the decisions, and PReLUs a 1-bit layer may fuse."""
    return set(decision_modules(model)) | {p for p, m in model.named_modules() if isinstance(m, nn.PReLU)}


def _slopes(model: nn.Module, site: DecisionSite) -> np.ndarray:
    """The PReLU slopes a fused site's reference applies: PyTorch's own where the file names the module."""
    if not site.slope_module:
        return np.asarray(site.slope, dtype=np.float32)
    try:
        weight = model.get_submodule(site.slope_module).weight.detach().float().reshape(-1).numpy()
    except AttributeError as exc:
        raise UserError(f"the fused slopes of {site.path} name no PReLU ({site.slope_module})", REEXPORT) from exc
    return np.broadcast_to(weight, (len(site.slope),)).astype(np.float32)


def paired_sites(model: nn.Module, sites: list[DecisionSite]) -> list[DecisionSite]:
    """Sites with their module path: named in the file, or (files written before Sign nodes were
    named) paired in order with the decision modules no named site claims."""
    paths = decision_modules(model)
    named = {s.path for s in sites if s.path}
    missing = [p for p in paths if p not in named]
    unnamed = [s for s in sites if not s.path]
    if len(missing) != len(unnamed):
        first = missing[0] if missing else unnamed[0].input
        raise UserError(
            f"cannot pair the decision {first} with the ONNX graph ({len(missing)} modules, {len(unnamed)} nodes)",
            REEXPORT,
        )
    paired = [dataclasses.replace(s, path=p) for s, p in zip(unnamed, missing, strict=True)]
    return [s for s in sites if s.path] + paired


class TeacherForcedRunner:
    """Runs the deploy model with each decision module fed the backend's input (see the module docstring)."""

    backend = "torch"

    def __init__(
        self, model: DeployModel, output_names: list[str], sites: list[DecisionSite], threads: int | None = None
    ) -> None:
        self.model = model.eval()
        self.output_names = output_names
        self.sites = paired_sites(model, sites)
        self.threads = threads

    @torch.inference_mode()
    def run_forced(self, images: np.ndarray, candidate: dict[str, np.ndarray], sink: Sink) -> dict[str, np.ndarray]:
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(self.threads or before)
            with _forced(self.model, self.sites, candidate, sink):
                values = self.model.run(torch.from_numpy(images))
        finally:
            torch.set_num_threads(before)
        return {name: values[name].numpy() for name in self.output_names}


@contextlib.contextmanager
def _forced(
    model: nn.Module, sites: list[DecisionSite], candidate: dict[str, np.ndarray], sink: Sink
) -> Iterator[None]:
    by_path: dict[str, list[DecisionSite]] = defaultdict(list)
    for site in sites:
        by_path[site.path].append(site)
    pending: dict[int, DecisionRecord] = {}

    def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...], path: str) -> tuple[torch.Tensor, ...]:
        # A module called once per pyramid level appears once per level; the input shape tells which.
        own = args[0]
        matches = [s for s in by_path[path] if candidate[s.input].shape == tuple(own.shape)]
        if len(matches) != 1:
            raise UserError(
                f"cannot match decision {path} (input {tuple(own.shape)}) to the ONNX graph",
                REEXPORT,
            )
        site = matches[0]
        forced = torch.from_numpy(candidate[site.input])
        pending[id(module)] = DecisionRecord(
            site, own.numpy(), candidate[site.input], module.decide(own).numpy(), module.decide(forced).numpy()
        )
        return (forced,)

    def post_hook(module: nn.Module, _args: object, output: torch.Tensor) -> None:
        record = pending.pop(id(module))
        site = record.site
        ref = output.numpy()
        if site.residual or site.activation != "none":  # a fused node: its epilogue on the backend's residual
            residual = candidate[site.residual] if site.residual else None
            ref = apply_epilogue(ref, site.activation, residual, _slopes(model, site))
        record.ref_output, record.got_output = ref, candidate[site.output]
        sink(record)

    def selection_hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        boxes, scores = (candidate[name] for name in module.names)
        nms_iou = float(args[2])
        sink(SelectionRecord(module.names[0], output[0].numpy(), output[1].numpy(), boxes, scores, nms_iou))
        return torch.from_numpy(boxes), torch.from_numpy(scores)

    handles = []
    try:
        for path, module in model.named_modules():
            if isinstance(module, DECISION_MODULES):
                if path not in by_path:
                    raise UserError(f"decision {path} has no counterpart in the ONNX graph", REEXPORT)
                handles.append(module.register_forward_pre_hook(lambda m, a, p=path: pre_hook(m, a, p)))
                handles.append(module.register_forward_hook(post_hook))
            elif isinstance(module, SELECTION_MODULES):
                handles.append(module.register_forward_hook(selection_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
