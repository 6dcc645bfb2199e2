"""Run a model with ``tod::BinaryConv2d`` nodes: onnxruntime for the float parts, the compiled kernel between.

Why not one InferenceSession with onnxruntime-extensions' Python hook (``ort_binary_conv``): that hook
copies every input of a node into a fresh NumPy array and the output back into onnxruntime's tensor.
In DFR-Det FCOS at 800x800 (2 threads, Xeon) the 56 kernels took 257 ms of an 870 ms inference and
the hook's copies and page faults most of the rest of the nodes' 711 ms; a native custom-op library
would avoid them, but onnxruntime's C API header is in none of the package indexes this project
builds from. Here onnxruntime's Python ``run`` wraps NumPy inputs and returns its outputs without
copying, and the kernel reads and writes NumPy arrays, so nothing is copied between the parts.

The graph is cut into steps by dependency waves: every float node whose inputs are ready joins the
current onnxruntime segment, then every ``tod`` node whose inputs are ready runs, and so on. A
ResNet-18 backbone with FPN and two head towers per level becomes ~20 segments, not one per node.
Each segment is an ordinary ONNX model with its own session (same threads and optimization level;
idle threads do not spin, as with the hook). A tensor is dropped after its last reader, as
onnxruntime's own planner does.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tod_deploy.errors import UserError, first_line
from tod_deploy.ops import binary_conv_cpu
from tod_deploy.ops.binary_conv_ref import OP_TYPE, BinaryConvAttrs, is_binary_conv


@dataclass(frozen=True)
class NodeArg:
    """What ``InferenceSession.get_inputs()``/``get_outputs()`` give: name, shape, type."""

    name: str
    shape: list[int | str | None]
    type: str


@dataclass
class _Segment:
    session: Any  # onnxruntime.InferenceSession over the segment's nodes
    inputs: list[str]
    outputs: list[str]


@dataclass
class _BinaryNode:
    name: str
    inputs: list[str]  # X, W_packed, alpha, bias, residual, slope
    output: str
    attrs: BinaryConvAttrs


def _read_names(node: onnx.NodeProto) -> Iterable[str]:
    """Tensors a node reads, including outer-scope names its subgraphs (If, Loop) read."""
    yield from (name for name in node.input if name)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                yield from _read_names(inner)


def _waves(nodes: Sequence[onnx.NodeProto], ready: set[str]) -> list[list[onnx.NodeProto]]:
    """Groups of float nodes and of ``tod`` nodes, alternating, each runnable once the ones before have run."""
    produced = {out for node in nodes for out in node.output if out}

    def runnable(node: onnx.NodeProto) -> bool:
        return all(name in ready or name not in produced for name in _read_names(node))

    pending = list(nodes)
    steps: list[list[onnx.NodeProto]] = []
    while pending:
        floats, rest = [], []
        for node in pending:  # in file order, which ONNX requires to be topological
            if not is_binary_conv(node) and runnable(node):
                floats.append(node)
                ready.update(out for out in node.output if out)
            else:
                rest.append(node)
        binaries = [node for node in rest if is_binary_conv(node) and runnable(node)]  # none reads another
        if not floats and not binaries:
            raise UserError("the model's graph is not in topological order", "re-export it with tod-deploy")
        for node in binaries:
            ready.update(out for out in node.output if out)
        pending = [node for node in rest if node not in binaries]
        steps.extend(group for group in (floats, binaries) if group)
    return steps


def _segment_constants(
    nodes: Sequence[onnx.NodeProto], initializers: set[str], needed: set[str]
) -> dict[str, onnx.NodeProto]:
    """Float nodes computed from stored tensors alone (a weight's DequantizeLinear, a Constant), by output.

    In dependency waves they would all run in the first segment and hand their values to later ones as
    inputs; onnxruntime then sees a Conv whose weight is an input, not a DequantizeLinear of a constant,
    and cannot fuse DQ -> Conv -> Q into QLinearConv (measured: DFR-Det's INT8 FPN convs ran as float
    Conv, 0.86x FP32). So each segment computes the ones it reads itself. Those a ``tod`` node or the
    caller reads (``needed``) stay in the waves."""
    known = set(initializers)
    found: dict[str, onnx.NodeProto] = {}
    for node in nodes:  # file order, which ONNX requires to be topological
        reads = list(_read_names(node))
        if is_binary_conv(node) or not all(name in known for name in reads):
            continue
        if any(out in needed for out in node.output):
            continue
        for out in node.output:
            if out:
                found[out] = node
                known.add(out)
    return found


def _producers(group: Sequence[onnx.NodeProto], local: Mapping[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The ``local`` nodes the group reads, and the ``local`` nodes those read, each once."""
    found: dict[int, onnx.NodeProto] = {}
    stack = [name for node in group for name in _read_names(node)]
    while stack:
        node = local.get(stack.pop())
        if node is not None and id(node) not in found:
            found[id(node)] = node
            stack.extend(_read_names(node))
    return list(found.values())


def _inferred(model: onnx.ModelProto) -> onnx.GraphProto:
    """The graph with ONNX shape inference's types. A ``tod`` output is float32 by the op's contract: that
    is declared first, so types flow on where this process has not registered the op's schema."""
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    known = {info.name for info in [*typed.graph.value_info, *typed.graph.output] if info.type.tensor_type.elem_type}
    for node in typed.graph.node:
        if is_binary_conv(node) and node.output[0] not in known:
            typed.graph.value_info.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    return onnx.shape_inference.infer_shapes(typed).graph


class SegmentedSession:
    """InferenceSession's ``run``/``get_inputs``/``get_outputs`` for a model with ``tod`` nodes (module docstring)."""

    def __init__(self, model: onnx.ModelProto, options: Any) -> None:
        graph = model.graph
        inferred = _inferred(model)
        self._types = {  # a graph output may be declared without a type (calibration's); inference has it
            info.name: info.type
            for info in [*inferred.output, *inferred.input, *inferred.value_info]
            if info.type.WhichOneof("value") != "tensor_type" or info.type.tensor_type.elem_type
        }
        initializers = {init.name: init for init in graph.initializer}
        self._inputs = [info for info in graph.input if info.name not in initializers]
        self._outputs = list(graph.output)
        # Stored tensors the kernel reads (or the model outputs); the sessions keep their own.
        needed = {name for node in graph.node if is_binary_conv(node) for name in node.input}
        needed |= {info.name for info in self._outputs}
        self._constants = {name: numpy_helper.to_array(init) for name, init in initializers.items() if name in needed}
        ready = {info.name for info in self._inputs} | set(initializers)
        local = _segment_constants(graph.node, set(initializers), needed)
        steps = _waves([node for node in graph.node if node.output[0] not in local], set(ready) | set(local))
        order = {id(node): i for i, node in enumerate(graph.node)}
        profiling = options.enable_profiling
        self._kernel_events: list[dict[str, Any]] | None = [] if profiling else None
        self._profile_dir = Path(tempfile.mkdtemp(prefix="tod-profile-")) if profiling else None
        self._profile_start = time.perf_counter()  # onnxruntime's event times count from its session's start

        self._steps: list[_Segment | _BinaryNode] = []
        wanted = {info.name for info in self._outputs}
        read_after = [set() for _ in range(len(steps) + 1)]  # what the steps after each one read
        for index in range(len(steps) - 1, -1, -1):
            read_after[index] = read_after[index + 1] | {name for node in steps[index] for name in _read_names(node)}
        for index, wave in enumerate(steps):
            group = wave
            if not is_binary_conv(wave[0]):  # each segment computes the stored-tensor nodes it reads
                group = sorted([*_producers(wave, local), *wave], key=lambda node: order[id(node)])
            written = {out for node in group for out in node.output if out}
            if is_binary_conv(group[0]):
                self._steps.extend(self._binary(node) for node in group)
            else:
                reads = {name for node in group for name in _read_names(node)}
                inputs = sorted(name for name in reads - written if name in ready and name not in initializers)
                outputs = sorted(
                    name for name in written if (name in read_after[index + 1] or name in wanted) and name not in local
                )
                if outputs:  # a group nothing reads afterwards (dead nodes) needs no session
                    segment = self._segment(model, index, group, reads, inputs, outputs, initializers, options)
                    self._steps.append(segment)
            ready |= written
        self._drops = self._last_reads(wanted)
        self._threads = options.intra_op_num_threads or None
        self._buffers = threading.local()  # per thread: node name -> the output array it reuses

    def _segment(
        self,
        model: onnx.ModelProto,
        index: int,
        group: list[onnx.NodeProto],
        reads: set[str],
        inputs: list[str],
        outputs: list[str],
        initializers: Mapping[str, onnx.TensorProto],
        options: Any,
    ) -> _Segment:
        import onnxruntime as ort

        graph = helper.make_graph(
            group,
            f"{model.graph.name}_segment{index}",
            [self._value_info(name) for name in inputs],
            [self._value_info(name) for name in outputs],
            initializer=[initializers[name] for name in sorted(reads) if name in initializers],
        )
        sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        sub.functions.extend(model.functions)
        if self._profile_dir is not None:
            options.profile_file_prefix = str(self._profile_dir / f"segment{index}")
        try:
            session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            reason = first_line(exc)
            raise UserError(f"onnxruntime cannot load the model ({reason})", "re-export it with tod-deploy") from exc
        return _Segment(session, inputs, outputs)

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        if name not in self._types:
            raise UserError(f"cannot tell the type of tensor {name!r} (ONNX shape inference)", "re-export the model")
        info = onnx.ValueInfoProto(name=name)
        info.type.CopyFrom(self._types[name])
        return info

    def _binary(self, node: onnx.NodeProto) -> _BinaryNode:
        attrs = BinaryConvAttrs.from_onnx({a.name: helper.get_attribute_value(a) for a in node.attribute})
        return _BinaryNode(node.name or node.output[0], list(node.input), node.output[0], attrs)

    def _last_reads(self, wanted: set[str]) -> list[list[str]]:
        """Per step, the tensors no later step reads (dropped after it)."""
        seen: set[str] = set(wanted) | set(self._constants)
        drops: list[list[str]] = []
        for step in reversed(self._steps):
            reads = step.inputs
            drops.append([name for name in reads if name and name not in seen])
            seen.update(reads)
        return drops[::-1]

    def get_inputs(self) -> list[NodeArg]:
        return [_node_arg(info) for info in self._inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [_node_arg(info) for info in self._outputs]

    def end_profiling(self) -> str:
        """With ``enable_profiling``: one trace in onnxruntime's format (its events of every segment, and a
        ``BinaryConv2d`` node event per kernel call), written to the current folder as onnxruntime does."""
        if self._kernel_events is None:
            raise UserError("this session was made without enable_profiling", "set it in the SessionOptions")
        events = list(self._kernel_events)
        for step in self._steps:
            if isinstance(step, _Segment):
                segment_trace = Path(step.session.end_profiling())
                events.extend(json.loads(segment_trace.read_text()))
                segment_trace.unlink()
        self._profile_dir.rmdir()  # type: ignore[union-attr]
        path = Path(f"tod_segments_profile_{time.strftime('%Y-%m-%d_%H-%M-%S')}.json").resolve()
        path.write_text(json.dumps(events))
        return str(path)

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any], run_options: Any = None) -> list:
        names = list(output_names or [info.name for info in self._outputs])
        missing = [info.name for info in self._inputs if info.name not in input_feed]
        if missing:
            raise UserError(f"missing model inputs {missing}", "feed every input of the model")
        values: dict[str, Any] = dict(self._constants)
        values.update(input_feed)
        for step, drops in zip(self._steps, self._drops, strict=True):
            if isinstance(step, _Segment):
                outs = step.session.run(step.outputs, {name: values[name] for name in step.inputs}, run_options)
                values.update(zip(step.outputs, outs, strict=True))
            else:
                values[step.output] = self._run_binary(step, values, keep=step.output in names)
            for name in drops:
                values.pop(name, None)
        return [self._detached(values[name]) for name in names]

    def _detached(self, value: Any) -> Any:
        """The value, copied if it may share memory with an array a node reuses (onnxruntime may alias a
        segment's output to its input, e.g. for Reshape; the next run would overwrite it)."""
        buffers = self._buffers.__dict__.get("by_node", {})
        if isinstance(value, np.ndarray) and any(np.may_share_memory(value, b) for b in buffers.values()):
            return value.copy()
        return value

    def _run_binary(self, node: _BinaryNode, values: Mapping[str, Any], keep: bool) -> np.ndarray:
        x, w_packed, alpha, bias, residual, slope = (values[name] if name else None for name in node.inputs)
        out = None
        shape = np.shape(x)
        if not keep and len(shape) == 4:  # an intermediate: reuse this thread's array for the node
            buffers = self._buffers.__dict__.setdefault("by_node", {})
            want = (shape[0], np.shape(w_packed)[0], *node.attrs.output_size(*shape[2:]))
            if min(want) > 0:
                if buffers.get(node.name) is None or buffers[node.name].shape != want:
                    buffers[node.name] = np.empty(want, dtype=np.float32)
                out = buffers[node.name]
        start = time.perf_counter()
        y = binary_conv_cpu.binary_conv2d(
            x, w_packed, alpha, bias, node.attrs, residual=residual, slope=slope, threads=self._threads, out=out
        )
        if self._kernel_events is not None:
            args = {"op_name": OP_TYPE, "input_type_shape": [{"float": list(shape)}]}
            when = (start - self._profile_start) * 1e6
            event = {"cat": "Node", "name": f"{node.name}_kernel_time", "ts": when, "args": args}
            self._kernel_events.append(event | {"dur": (time.perf_counter() - start) * 1e6})
        return y


def _node_arg(info: onnx.ValueInfoProto) -> NodeArg:
    tensor = info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    type_name = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "undefined"
    return NodeArg(info.name, dims, f"tensor({_ORT_TYPE_NAMES.get(type_name, type_name)})")


_ORT_TYPE_NAMES = {"float32": "float", "float64": "double", "float16": "float16"}
