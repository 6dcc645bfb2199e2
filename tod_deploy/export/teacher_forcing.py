"""Parity for 1-bit models, one binary layer at a time ("teacher forcing").

Why: in a 1-bit network a value within rounding distance of a sign threshold may binarize
differently in two runtimes (their real-valued convs sum in different orders), and one flipped
bit changes the next layer's sums by 2 at nine positions, which flips more bits: end-to-end
outputs of a correct export diverge chaotically. So each binary layer is checked with the
*same* input in both runtimes: onnxruntime exposes every binary layer's input and output, and
PyTorch runs with each BinaryConv2d's input replaced by the one onnxruntime saw. Every binary
layer must then match exactly (its integer sums, to float tolerance after scaling), and the
final outputs to the usual tolerances.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from tod_deploy.nn.binary import BinaryConv2d

EXPORT_PREFIX = "model."  # ExportView holds the deploy model as ``model``
SIGN_OPS = ("Greater", "Less")
BINARIZE_OPS = ("Pad", "Where", "Not", "Cast", *SIGN_OPS)


@dataclass(frozen=True)
class BinarySite:
    path: str  # the BinaryConv2d's path in the deploy model
    x: str  # ONNX tensor entering the layer (before the sign)
    y: str  # ONNX tensor leaving it (after alpha and bias)


def _module_path(initializer: str, suffix: str) -> str:
    return initializer.removeprefix(EXPORT_PREFIX).removesuffix(suffix)


def binary_sites(model: onnx.ModelProto) -> list[BinarySite]:
    """Every binary layer of an export, in either mode (tod::BinaryConv2d nodes or decomposed)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    initializers = {init.name for init in model.graph.initializer}
    sites = []
    for node in model.graph.node:
        if node.domain == "tod" and node.op_type == "BinaryConv2d":
            sites.append(BinarySite(_module_path(node.input[1], ".w_packed"), node.input[0], node.output[0]))
        elif node.op_type == "Conv" and node.input[1] in producer:
            dq = producer[node.input[1]]
            if dq.op_type != "DequantizeLinear" or not dq.input[0].endswith(".weight_sign_int8"):
                continue
            path = _module_path(dq.input[0], ".weight_sign_int8")
            x = _pre_sign_input(node.input[0], producer)
            sites.append(BinarySite(path, x, _scaled_output(node, consumers, initializers)))
    return sites


def _pre_sign_input(tensor: str, producer: dict[str, onnx.NodeProto]) -> str:
    """Walk up from a decomposed conv's data input to the tensor its sign compares."""
    frontier = [tensor]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.op_type not in BINARIZE_OPS:
            continue
        if node.op_type in SIGN_OPS:
            return node.input[0]
        frontier.extend(node.input[:1] if node.op_type in ("Pad", "Not", "Cast") else node.input)
    raise ValueError(f"no sign found above {tensor}")


def _scaled_output(conv: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], initializers: set[str]) -> str:
    """The conv's output after ``* alpha`` and, if present, ``+ bias`` (both constants)."""
    out = conv.output[0]
    for op in ("Mul", "Add"):
        nxt = [n for n in consumers[out] if n.op_type == op and any(i in initializers for i in n.input if i != out)]
        if len(consumers[out]) != 1 or not nxt:
            break
        out = nxt[0].output[0]
    return out


@contextlib.contextmanager
def forced_inputs(
    model: nn.Module, sites: list[BinarySite], ort_values: dict[str, np.ndarray], outputs: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Within the block, each BinaryConv2d of ``model`` gets onnxruntime's input for that call;
    its output is stored in ``outputs`` under the site's ONNX output name."""
    by_path: dict[str, list[BinarySite]] = defaultdict(list)
    for site in sites:
        by_path[site.path].append(site)
    handles = []
    current: dict[int, BinarySite] = {}

    def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...], path: str) -> tuple[torch.Tensor, ...]:
        # A module called once per pyramid level appears once per level; the input shape tells which.
        matches = [s for s in by_path[path] if ort_values[s.x].shape == tuple(args[0].shape)]
        if len(matches) != 1:
            raise ValueError(f"cannot match binary layer {path} (input {tuple(args[0].shape)}) to the ONNX graph")
        current[id(module)] = matches[0]
        return (torch.from_numpy(ort_values[matches[0].x]),)

    def post_hook(module: nn.Module, _args: object, output: torch.Tensor) -> None:
        outputs[current[id(module)].y] = output

    try:
        for path, module in model.named_modules():
            if isinstance(module, BinaryConv2d):
                if path not in by_path:
                    raise ValueError(f"binary layer {path} has no counterpart in the ONNX graph")
                handles.append(module.register_forward_pre_hook(lambda m, a, p=path: pre_hook(m, a, p)))
                handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
