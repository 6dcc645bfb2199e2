"""An export or engine -> a Triton Inference Server model repository (``tod-deploy package --triton``).

Plan, then write (the house pattern): ``plan_repository`` reads the artifact and its sidecar and
decides every model directory, each ``config.pbtxt`` built as Triton's own ``ModelConfig`` protobuf
(tritonclient ships the schema) and checked before anything is written; ``write_repository`` writes
each model directory beside its final name and renames it into place, so a failed package leaves no
model that Triton would load half-written.

Which Triton backend runs the model:
- an ``.engine``: ``tensorrt_plan``; the tod::BinaryConv2d plugin is compiled into the engine (AOT),
  so the server needs no plugin library and no LD_PRELOAD;
- an ONNX of standard ops: the ``onnxruntime`` backend (CUDA / TensorRT execution accelerators
  configurable with ``--device gpu --accelerator ...``);
- an ONNX with tod::BinaryConv2d nodes (or ``--backend python``): Triton's ``python`` backend
  running tod-deploy's own onnxruntime session (``targets/triton_python.py``) on the CPU; the
  server's Python must have tod-deploy installed (``tod-deploy serve`` sees to it).

``--with-preprocess`` adds an ensemble whose entry takes encoded image bytes of any size:
``<name>_preprocess`` letterboxes them to the model's input, ``<name>`` detects, ``<name>_postprocess``
maps the boxes back to the original image's pixels and names the classes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tod_deploy.artifacts import ENGINE_SUFFIX, Sidecar, TensorSpec, sidecar_path
from tod_deploy.errors import UserError

BACKENDS = ("auto", "python", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "gpu")
ACCELERATORS = ("none", "cuda", "tensorrt")
CONTRACT = ("num_dets", "boxes", "scores", "labels")
ROLE_PARAMETER = "tod_deploy_role"  # which step of triton_python a python-backend model runs
PYTHON_ENTRY = '''"""Triton Python backend entry, written by `tod-deploy package --triton`: the code is tod-deploy's."""

import os
import site

# Triton's stub starts an isolated Python that may not find the packages of the environment it was
# started from (a libpython of another build reports other site dirs): add them, .pth hooks and
# all, from the list `tod-deploy serve` passes; in a Triton container the interpreter's own serve.
site.main()
for folder in os.environ.get("TOD_DEPLOY_SITE_PACKAGES", "").split(os.pathsep):
    if folder:
        site.addsitedir(folder)

from tod_deploy.targets.triton_python import TritonPythonModel  # noqa: E402, F401
'''
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class TritonOptions:
    """What a user chooses about the served model (the rest comes from the artifact and its sidecar)."""

    name: str | None = None  # default: the file's stem
    backend: str = "auto"
    max_batch: int = 8  # for models that batch (dynamic ONNX batch, engine profile, python backend)
    instances: int = 1
    device: str = "cpu"
    accelerator: str = "none"  # onnxruntime backend on a GPU: cuda (its default) or tensorrt
    queue_delay_us: int = 500
    threads: int = 0  # python backend: onnxruntime threads per instance (0: every core)
    with_preprocess: bool = False

    def check(self) -> None:
        for flag, value, allowed in (
            ("--backend", self.backend, BACKENDS),
            ("--device", self.device, DEVICES),
            ("--accelerator", self.accelerator, ACCELERATORS),
        ):
            if value not in allowed:
                raise UserError(f"{flag} {value!r} is not one of {', '.join(allowed)}", f"pass {flag} {allowed[0]}")
        if self.max_batch < 1 or self.instances < 1 or self.queue_delay_us < 0 or self.threads < 0:
            raise UserError(
                "--max-batch and --instances must be >= 1, --queue-delay-us and --threads >= 0",
                "e.g. --max-batch 8 --instances 1",
            )
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise UserError(f"model name {self.name!r} is not a Triton model name", "use letters, digits, _ . -")


@dataclass
class ModelDir:
    """One model of the repository: its config and the files of version 1 (name -> bytes or a file to copy)."""

    name: str
    config: Any  # tritonclient's model_config_pb2.ModelConfig
    files: dict[str, bytes | Path] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config.platform or self.config.backend


@dataclass
class RepositoryPlan:
    models: list[ModelDir]
    entry: str  # the model clients call
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entry": self.entry,
            "models": [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "max_batch_size": m.config.max_batch_size,
                    "config": config_text(m.config),
                }
                for m in self.models
            ],
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------- planning


def plan_repository(model_path: Path, options: TritonOptions) -> RepositoryPlan:
    """Decide every model directory for ``model_path`` (.onnx or .engine); nothing is written."""
    options.check()
    if not model_path.is_file():
        raise UserError(f"{model_path} does not exist", "pass an .onnx from tod-deploy export or an .engine")
    sidecar = Sidecar.load(model_path)
    if model_path.suffix == ENGINE_SUFFIX:
        make_detector = _engine_model
    elif model_path.suffix == ".onnx":
        make_detector = _onnx_model
    else:
        raise UserError(f"{model_path.name} is neither .onnx nor .engine", "package an export or a built engine")
    detector, notes = make_detector(model_path, sidecar, options)
    models = [detector]
    entry = models[0].name
    if options.with_preprocess:
        models += _preprocess_models(models[0], sidecar, options)
        entry = models[-1].name
    for model in models:
        check_config(model.config)
    return RepositoryPlan(models, entry, notes)


def _base_config(name: str, max_batch: int, options: TritonOptions, *, gpu: bool) -> Any:
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(name=name, max_batch_size=max_batch)
    group = config.instance_group.add()
    group.kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    group.count = options.instances
    if max_batch > 1:
        config.dynamic_batching.preferred_batch_size.extend([b for b in (2, 4, 8, 16, 32, 64) if b <= max_batch])
        config.dynamic_batching.max_queue_delay_microseconds = options.queue_delay_us
    return config


def _add_tensors(config: Any, specs: tuple[TensorSpec, ...], *, inputs: bool, batched: bool, squeeze: set[str]) -> None:
    """Declare tensors; a batched model's dims leave out the batch. A per-image scalar (``num_dets``,
    shape [N]) is declared [1] and, where the model itself gives [N] (``squeeze``), reshaped to []."""
    for spec in specs:
        tensor = (config.input if inputs else config.output).add()
        tensor.name = spec.name
        tensor.data_type = triton_dtype(spec.dtype)
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in spec.shape]
        dims = dims[1:] if batched else dims
        if not dims:
            dims = [1]
            if spec.name in squeeze:
                tensor.reshape.SetInParent()
        tensor.dims.extend(dims)


def _onnx_model(path: Path, sidecar: Sidecar, options: TritonOptions) -> tuple[ModelDir, list[str]]:
    from tod_deploy.backends.onnxruntime_runner import load_onnx
    from tod_deploy.ops.ort_binary_conv import uses_binary_conv

    binary = uses_binary_conv(load_onnx(path))
    backend = options.backend
    if backend == "auto":
        backend = "python" if binary else "onnxruntime"
    if backend == "tensorrt":
        raise UserError(f"{path.name} is an ONNX file", f"build an engine first: tod-deploy build-engine {path}")
    if backend == "onnxruntime" and binary:
        raise UserError(
            f"{path.name} has tod::BinaryConv2d nodes, which Triton's onnxruntime backend cannot run",
            "use --backend python, an engine, or re-export with --binary-conv decompose",
        )
    io, notes = sidecar.io, []
    name = options.name or _default_name(path)
    batch = io.inputs[0].shape[0]
    if backend == "python":
        if options.device == "gpu" or options.accelerator != "none":
            notes.append(
                "the python backend runs tod-deploy's onnxruntime session on the CPU: --device/--accelerator ignored"
            )
        config = _base_config(name, options.max_batch, options, gpu=False)
        config.backend = "python"
        _add_tensors(config, io.inputs, inputs=True, batched=True, squeeze=set())
        _add_tensors(config, io.outputs, inputs=False, batched=True, squeeze=set())
        _set_parameters(config, {ROLE_PARAMETER: "detector", "onnx": "model.onnx", "threads": str(options.threads)})
        files: dict[str, bytes | Path] = {
            "model.py": PYTHON_ENTRY.encode(),
            "model.onnx": path,
            "model.json": sidecar_path(path),
        }
        if isinstance(batch, int) and batch > 0:
            notes.append(
                f"the ONNX takes batches of {batch}: the python model runs a server batch in chunks of {batch}"
            )
    else:
        gpu = options.device == "gpu"
        if options.accelerator != "none" and not gpu:
            raise UserError(f"--accelerator {options.accelerator} runs on a GPU", "add --device gpu")
        max_batch = _max_batch_of(batch, options.max_batch, notes)
        config = _base_config(name, max_batch, options, gpu=gpu)
        config.backend = "onnxruntime"
        config.default_model_filename = "model.onnx"
        _add_tensors(config, io.inputs, inputs=True, batched=max_batch > 0, squeeze=set())
        _add_tensors(config, io.outputs, inputs=False, batched=max_batch > 0, squeeze={o.name for o in io.outputs})
        if options.accelerator == "tensorrt":
            accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
            accelerator.name = "tensorrt"
            accelerator.parameters["precision_mode"] = "FP16" if sidecar.precision == "fp16" else "FP32"
        files = {"model.onnx": path}
    return ModelDir(name, config, files), notes


def _engine_model(path: Path, sidecar: Sidecar, options: TritonOptions) -> tuple[ModelDir, list[str]]:
    if options.backend not in ("auto", "tensorrt"):
        raise UserError(f"{path.name} is a TensorRT engine", "package it with --backend tensorrt (or auto)")
    plan = sidecar["plan"]
    if not plan.get("export"):
        raise UserError(f"{path.name} was built from an ONNX without export sidecar", "package its ONNX instead")
    notes = []
    if options.device != "gpu":
        notes.append("a TensorRT engine runs on the GPU: instance group KIND_GPU")
    profile_max = int(plan["profiles"][0]["max"][0]) if plan.get("profiles") else None
    batch = plan["inputs"][0]["shape"][0]
    name = options.name or _default_name(path)
    if isinstance(batch, int) and batch > 0:
        max_batch = _max_batch_of(batch, options.max_batch, notes)
    else:
        max_batch = min(options.max_batch, profile_max or options.max_batch)
    config = _base_config(name, max_batch, options, gpu=True)
    config.backend = "tensorrt"
    config.platform = "tensorrt_plan"
    config.default_model_filename = "model.plan"
    io = sidecar.io
    _add_tensors(config, io.inputs, inputs=True, batched=max_batch > 0, squeeze=set())
    _add_tensors(config, io.outputs, inputs=False, batched=max_batch > 0, squeeze={o.name for o in io.outputs})
    return ModelDir(name, config, {"model.plan": path}), notes


def _max_batch_of(batch: int | str, wanted: int, notes: list[str]) -> int:
    """max_batch_size for a runtime that takes the file's batch as it is: a symbolic batch -> the
    option, a fixed batch of 1 -> 1, a fixed batch > 1 -> 0 (Triton passes whole tensors, no batching)."""
    if not isinstance(batch, int) or batch <= 0:
        return wanted
    if batch == 1:
        if wanted > 1:
            notes.append(
                "the model takes one image at a time (export --batch 1): re-export with --batch dynamic to batch"
            )
        return 1
    notes.append(f"the model takes exactly {batch} images: no batching (re-export with --batch dynamic to batch)")
    return 0


def _preprocess_models(detector: ModelDir, sidecar: Sidecar, options: TritonOptions) -> list[ModelDir]:
    """``<name>_preprocess`` -> ``<name>`` -> ``<name>_postprocess``, and the ensemble clients call."""
    from tritonclient.grpc import model_config_pb2 as mc

    if sidecar.export.get("raw_export"):
        raise UserError("a --raw export has no detections to map back to the image", "package a standard export")
    max_batch = detector.config.max_batch_size
    if max_batch == 0:
        raise UserError(
            "--with-preprocess needs a model that takes one image per batch item", "re-export with --batch dynamic"
        )
    height, width = sidecar.recipe.input_size
    outputs = {o.name: o for o in sidecar.io.outputs}
    missing = [name for name in ("images", *CONTRACT) if name not in outputs and name != sidecar.io.inputs[0].name]
    if missing:
        raise UserError(f"the model lacks the deploy contract's tensors {missing}", "package a standard export")
    top_k = int(outputs["boxes"].shape[1])
    image = TensorSpec("image", "object", (-1, 1))
    letterbox = TensorSpec("letterbox", "float32", (-1, 6))
    images = TensorSpec("images", "float32", (-1, 3, height, width))  # the deploy contract's input
    detections = (
        TensorSpec("num_dets", "int32", (-1,)),
        TensorSpec("boxes", "float32", (-1, top_k, 4)),
        TensorSpec("scores", "float32", (-1, top_k)),
        TensorSpec("labels", "int32", (-1, top_k)),
    )
    named = (*detections, TensorSpec("class_names", "object", (-1, top_k)))
    base = detector.name

    pre = _base_config(f"{base}_preprocess", max_batch, options, gpu=False)
    pre.backend = "python"
    _add_tensors(pre, (image,), inputs=True, batched=True, squeeze=set())
    _add_tensors(pre, (images, letterbox), inputs=False, batched=True, squeeze=set())
    _set_parameters(pre, {ROLE_PARAMETER: "preprocess", "input_height": str(height), "input_width": str(width)})

    post = _base_config(f"{base}_postprocess", max_batch, options, gpu=False)
    post.backend = "python"
    _add_tensors(post, (*detections, letterbox), inputs=True, batched=True, squeeze=set())
    _add_tensors(post, named, inputs=False, batched=True, squeeze=set())
    _set_parameters(post, {ROLE_PARAMETER: "postprocess"})
    classes = "\n".join(sidecar.class_names) + "\n"

    ensemble = mc.ModelConfig(name=f"{base}_ensemble", platform="ensemble", max_batch_size=max_batch)
    _add_tensors(ensemble, (image,), inputs=True, batched=True, squeeze=set())
    _add_tensors(ensemble, named, inputs=False, batched=True, squeeze=set())
    steps = ensemble.ensemble_scheduling.step
    steps.add(model_name=pre.name, model_version=-1, input_map={"image": "image"},
              output_map={images.name: "_images", "letterbox": "_letterbox"})  # fmt: skip
    steps.add(model_name=base, model_version=-1, input_map={images.name: "_images"},
              output_map={d.name: f"_{d.name}" for d in detections})  # fmt: skip
    steps.add(model_name=post.name, model_version=-1,
              input_map={**{d.name: f"_{d.name}" for d in detections}, "letterbox": "_letterbox"},
              output_map={t.name: t.name for t in named})  # fmt: skip
    return [
        ModelDir(pre.name, pre, {"model.py": PYTHON_ENTRY.encode()}),
        ModelDir(post.name, post, {"model.py": PYTHON_ENTRY.encode(), "classes.txt": classes.encode()}),
        ModelDir(ensemble.name, ensemble, {}),
    ]


# --------------------------------------------------------------------------------- the schema


def triton_dtype(numpy_name: str) -> int:
    """NumPy's dtype name -> Triton's ``DataType`` (``object`` is Triton's BYTES/TYPE_STRING)."""
    from tritonclient.grpc import model_config_pb2 as mc

    table = {
        "float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "float64": mc.TYPE_FP64, "bfloat16": mc.TYPE_BF16,
        "int8": mc.TYPE_INT8, "int16": mc.TYPE_INT16, "int32": mc.TYPE_INT32, "int64": mc.TYPE_INT64,
        "uint8": mc.TYPE_UINT8, "bool": mc.TYPE_BOOL, "object": mc.TYPE_STRING, "bytes": mc.TYPE_STRING,
    }  # fmt: skip
    if numpy_name not in table:
        raise UserError(f"tensor type {numpy_name} has no Triton data type", "re-export the model")
    return table[numpy_name]


def config_text(config: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def check_config(config: Any) -> None:
    """The config as Triton reads it: the text parses back into ``ModelConfig`` unchanged (the schema),
    and the rules Triton applies on load hold (names, dims, batching, ensemble wiring)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    where = f"config.pbtxt of {config.name!r}"
    try:
        parsed = text_format.Parse(config_text(config), mc.ModelConfig())
    except text_format.ParseError as exc:  # pragma: no cover - a bug of ours, reported as one
        raise UserError(f"{where} does not match Triton's schema ({exc})", "report this as a tod-deploy bug") from exc
    problems = []
    if parsed != config:
        problems.append("it does not read back as written")
    if not _NAME.fullmatch(parsed.name):
        problems.append(f"model name {parsed.name!r}")
    if (parsed.platform == "ensemble") == bool(parsed.backend):
        problems.append("needs exactly one of backend or platform 'ensemble'")
    for kind, tensors in (("input", parsed.input), ("output", parsed.output)):
        names = [t.name for t in tensors]
        if not names or len(set(names)) != len(names):
            problems.append(f"{kind} names {names} are empty or repeated")
        for tensor in tensors:
            if tensor.data_type == mc.TYPE_INVALID or not tensor.dims or any(d == 0 or d < -1 for d in tensor.dims):
                problems.append(f"{kind} {tensor.name!r} has type {tensor.data_type} and dims {list(tensor.dims)}")
    if parsed.max_batch_size < 0 or (parsed.max_batch_size <= 1 and parsed.HasField("dynamic_batching")):
        problems.append(f"max_batch_size {parsed.max_batch_size} with dynamic batching")
    if parsed.platform == "ensemble":
        produced = {t.name for t in parsed.input}
        for step in parsed.ensemble_scheduling.step:
            unknown = [t for t in step.input_map.values() if t not in produced]
            if unknown:
                problems.append(f"step {step.model_name} reads {unknown} before any step writes them")
            produced |= set(step.output_map.values())
        unmade = [t.name for t in parsed.output if t.name not in produced]
        if unmade:
            problems.append(f"outputs {unmade} are made by no step")
    if problems:
        raise UserError(f"{where} would not load in Triton: {'; '.join(problems)}", "report this as a tod-deploy bug")


def _set_parameters(config: Any, values: dict[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def _default_name(path: Path) -> str:
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


# --------------------------------------------------------------------------------- writing


def write_repository(plan: RepositoryPlan, repository: Path, *, overwrite: bool = False) -> list[Path]:
    """Write each model directory (``config.pbtxt`` + ``1/``) beside its final name, then rename it in.

    An existing model of the same name is replaced only with ``overwrite``; other models in the
    repository are left alone.
    """
    repository.mkdir(parents=True, exist_ok=True)
    existing = [m.name for m in plan.models if (repository / m.name).exists()]
    if existing and not overwrite:
        raise UserError(
            f"{repository} already has the model(s) {', '.join(existing)}", "add --overwrite, or --name NEW"
        )
    written = []
    for model in plan.models:
        target = repository / model.name
        staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.", suffix=".partial", dir=repository))
        try:
            (staging / "config.pbtxt").write_text(config_text(model.config))
            version = staging / "1"
            version.mkdir()
            for name, content in model.files.items():
                if isinstance(content, Path):
                    shutil.copyfile(content, version / name)
                else:
                    (version / name).write_bytes(content)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written.append(target)
    return written
