"""``build-engine``: ONNX -> TensorRT 11 engine, planned first (anywhere), built second (on a GPU).

``plan_build`` reads the ONNX and its export sidecar and decides everything the builder will be
given (profiles, workspace, timing cache, plugins, precision) without TensorRT, so a plan can be
checked on any machine and tested here. ``build_engine`` hands that plan to TensorRT 11.

TensorRT 11 networks are strongly typed: precision is what the ONNX says (float32, float16 from an
autocast pass, INT8 from Q/DQ nodes), never a builder flag; BuilderFlag.FP16/INT8 are gone
(https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from tod_deploy.artifacts import Sidecar, sidecar_path, staged
from tod_deploy.backends.onnxruntime_runner import load_onnx
from tod_deploy.environment import environment, tod_deploy_version
from tod_deploy.errors import UserError
from tod_deploy.trt.plugins import KNOWN_PLUGINS, register_plugins, tensorrt_view
from tod_deploy.trt.profiles import Profile, onnx_inputs, resolve_profiles

Log = Callable[[str], None]
DEFAULT_WORKSPACE_GIB = 4.0
GIB = 1 << 30
SIDECAR_KEYS = ("method", "recipe", "weights", "raw_export", "io")  # what bench/verify need from the export


@dataclass
class BuildPlan:
    """Everything ``build_engine`` passes to TensorRT, and where the results go."""

    onnx: str
    onnx_sha256: str
    output: str
    inputs: list[dict[str, Any]]
    profiles: list[Profile]
    workspace_bytes: int
    timing_cache: str | None
    plugins: list[str]
    precision: str
    strongly_typed: bool = True
    export: dict[str, Any] | None = None  # the export sidecar's method, recipe, weights and I/O
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx,
            "onnx_sha256": self.onnx_sha256,
            "output": self.output,
            "sidecar": str(sidecar_path(Path(self.output))),
            "inputs": self.inputs,
            "profiles": [p.to_dict() for p in self.profiles],
            "workspace_bytes": self.workspace_bytes,
            "timing_cache": self.timing_cache,
            "plugins": self.plugins,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "export": self.export,
            "notes": self.notes,
        }

    def describe(self) -> str:
        """The plan as a user reads it before a build of several minutes."""
        lines = [f"build plan: {self.onnx} -> {self.output}", f"  precision      {self.precision} (from the ONNX)"]
        for p in self.profiles:
            shapes = "  ".join(f"{bound} {'x'.join(map(str, getattr(p, bound)))}" for bound in ("min", "opt", "max"))
            lines.append(f"  profile        {p.input}: {shapes}")
        lines.append(f"  workspace      {self.workspace_bytes / GIB:g} GiB")
        lines.append(f"  timing cache   {self.timing_cache or 'none'}")
        lines.append(f"  plugins        {', '.join(self.plugins) or 'none'}")
        lines.extend(f"  note           {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class BuildResult:
    engine_path: Path
    sidecar_path: Path
    sidecar: Sidecar


def onnx_precision(model: onnx.ModelProto) -> str:
    """INT8 if the graph quantizes activations (QuantizeLinear), FP16 if it holds float16 tensors, else FP32.

    DequantizeLinear alone does not make INT8: the decomposed 1-bit convs store +-1 weights as int8
    and dequantize them to float32, which computes in FP32.
    """
    graph = model.graph
    if any(node.op_type == "QuantizeLinear" for node in graph.node):
        return "INT8"
    half = onnx.TensorProto.FLOAT16
    values = [*graph.input, *graph.output, *graph.value_info]
    if (
        any(v.type.tensor_type.elem_type == half for v in values)
        or any(init.data_type == half for init in graph.initializer)
        or any(a.name == "to" and a.i == half for node in graph.node if node.op_type == "Cast" for a in node.attribute)
    ):
        return "FP16"
    return "FP32"


def plugins_needed(model: onnx.ModelProto) -> list[str]:
    """The TensorRT plugins the graph's custom-domain nodes need (``domain::op_type``)."""
    needed = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    unknown = [p for p in needed if p not in KNOWN_PLUGINS]
    if unknown:
        raise UserError(
            f"the model has {unknown[0]} nodes, for which tod-deploy has no TensorRT plugin",
            "re-export with standard ops (e.g. --binary-conv decompose)",
        )
    return needed


def plan_build(
    onnx_path: Path,
    output: Path | None = None,
    min_shape: str | None = None,
    opt_shape: str | None = None,
    max_shape: str | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    timing_cache: Path | None = None,
) -> BuildPlan:
    """Read and validate everything a build needs; no TensorRT involved."""
    model = load_onnx(onnx_path)
    output = output or onnx_path.with_suffix(".engine")
    if output.suffix != ".engine":
        raise UserError(f"engine output {output} does not end in .engine", "pass --output NAME.engine")
    if workspace_gib <= 0:
        raise UserError(f"--workspace {workspace_gib:g} GiB is not positive", "give e.g. --workspace 4")
    export = None
    if sidecar_path(onnx_path).is_file():
        sidecar = Sidecar.load(onnx_path)
        export = {key: sidecar.get(key) for key in SIDECAR_KEYS}
    input_size = None
    if export and export.get("recipe"):
        h, w = export["recipe"]["input_size"]
        input_size = (int(h), int(w))
    inputs = onnx_inputs(model)
    profiles = resolve_profiles(inputs, min_shape, opt_shape, max_shape, input_size)
    notes = [] if export else [f"no export sidecar beside {onnx_path.name}: profiles come from the ONNX and flags"]
    return BuildPlan(
        onnx=str(onnx_path),
        onnx_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        output=str(output),
        inputs=[{"name": s.name, "dtype": s.dtype, "shape": list(s.dims)} for s in inputs],
        profiles=profiles,
        workspace_bytes=int(workspace_gib * GIB),
        timing_cache=str(timing_cache) if timing_cache else None,
        plugins=plugins_needed(model),
        precision=onnx_precision(model),
        export=export,
        notes=notes,
    )


def build_serialized(plan: BuildPlan, log: Log = print) -> bytes:
    """TensorRT 11: parse (plugins registered first), profile, build; returns the engine's bytes."""
    from tod_deploy.trt.runtime import require_tensorrt

    trt = require_tensorrt()
    if plan.plugins:
        register_plugins()  # the parser looks plugins up while parsing; only then (see the runner)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # No creation flags: strong typing is always on in TensorRT 11 and its STRONGLY_TYPED flag is
    # "deprecated in TensorRT 11.0 ... retained for API compatibility but is ignored" (11.4 binding).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    model = load_onnx(Path(plan.onnx))
    if plan.plugins:
        model = tensorrt_view(model)
    if not parser.parse(model.SerializeToString(), str(Path(plan.onnx).resolve())):
        raise UserError(f"TensorRT's ONNX parser rejected {Path(plan.onnx).name}: {_parser_errors(parser)}",
                        "run tod-deploy check --target tensorrt on it to see which nodes TensorRT lacks")  # fmt: skip
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then reports per-layer types
    profile = builder.create_optimization_profile()
    for p in plan.profiles:
        profile.set_shape(p.input, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    cache_path = Path(plan.timing_cache) if plan.timing_cache else None
    attach_timing_cache(config, cache_path, log)
    log(f"building TensorRT {trt.__version__} engine ({plan.precision}) - this takes minutes ...")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError("TensorRT failed to build the engine (its log above says why)", "rerun with --debug")
    log(f"built in {time.perf_counter() - start:.0f} s")
    if cache_path is not None:
        with staged(cache_path) as (tmp,):
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def attach_timing_cache(config: Any, path: Path | None, log: Log) -> None:
    """Reuse a timing cache file if TensorRT accepts it, else start a fresh one (overwritten after the build).

    ``set_timing_cache`` returns False for a cache "created from a different device" (or another
    TensorRT) when strict verification is on (11.4 binding): its timings would not hold for this GPU.
    """
    data = path.read_bytes() if path is not None and path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
        return
    if not data:
        raise UserError("TensorRT refused an empty timing cache", "rerun with --debug and report it")
    log(f"note: {path} was built on another GPU or TensorRT version; timing afresh and replacing it")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise UserError("TensorRT refused an empty timing cache", "rerun with --debug and report it")


def _parser_errors(parser: Any) -> str:
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    described = [f"node {e.node_name() or e.node()} ({e.node_operator()}): {e.desc()}" for e in errors[:3]]
    more = f" and {len(errors) - 3} more" if len(errors) > 3 else ""
    return "; ".join(described) + more


def inspect_engine(serialized: bytes) -> dict[str, Any]:
    """The engine inspector's JSON (layers, their types and precisions), summarized for the sidecar."""
    from tod_deploy.trt.runtime import require_tensorrt

    trt = require_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
    if engine is None:  # "returns: The ICudaEngine, or None if it could not be deserialized"
        raise UserError("TensorRT could not load the engine it just built", "rerun with --debug and report it")
    inspector = engine.create_engine_inspector()
    return layer_summary(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def layer_summary(info_json: str) -> dict[str, Any]:
    """Layers with type and output precision, counted per type and per precision.

    TensorRT 11 reports a layer output's type as ``DataType`` (10.x folded it into ``Format/Datatype``)
    and the engine's I/O as ``I/O Tensors``
    (https://docs.nvidia.com/deeplearning/tensorrt/11.3.0/api/migration/tensorrt-10x-to-11x-IEngineInspector.html).
    """
    info = json.loads(info_json)
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # built without detailed profiling verbosity: names only
            layers.append({"name": layer, "type": "?", "precision": "?"})
            continue
        outputs = layer.get("Outputs") or [{}]
        precision = outputs[0].get("DataType") or outputs[0].get("Format/Datatype") or "?"
        layers.append({"name": layer.get("Name", "?"), "type": layer.get("LayerType", "?"), "precision": precision})
    return {
        "layers": len(layers),
        "by_type": dict(Counter(layer["type"] for layer in layers).most_common()),
        "by_precision": dict(Counter(layer["precision"] for layer in layers).most_common()),
        "io_tensors": info.get("I/O Tensors", []),
        "detail": layers,
    }


def build_engine(plan: BuildPlan, log: Log = print) -> BuildResult:
    """Build, inspect, and write ``<name>.engine`` + ``<name>.engine.json`` together or not at all."""
    from tod_deploy.trt.runtime import require_tensorrt

    trt = require_tensorrt()
    serialized = build_serialized(plan, log)
    engine_path = Path(plan.output)
    sidecar = Sidecar({
        "tod_deploy_version": tod_deploy_version(),
        "engine": {
            "file": engine_path.name,
            "bytes": len(serialized),
            "sha256": hashlib.sha256(serialized).hexdigest(),
            "tensorrt": trt.__version__,
        },
        "plan": plan.to_dict(),
        "layers": inspect_engine(serialized),
        "environment": environment(),
    })
    sidecar_file = sidecar_path(engine_path)
    with staged(engine_path, sidecar_file) as (tmp_engine, tmp_json):
        tmp_engine.write_bytes(serialized)
        sidecar.save(tmp_json)
    return BuildResult(engine_path, sidecar_file, sidecar)
