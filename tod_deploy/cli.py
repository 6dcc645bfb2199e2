"""The ``tod-deploy`` command line: argument handling only; the work happens in the step modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tod_deploy.errors import UserError
from tod_deploy.registry import method_names

app = typer.Typer(
    name="tod-deploy",
    help="Deploy tiny-object detectors: export to ONNX with parity proof, build engines, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# Piped output (CI logs, `| tee`) gets a width that fits the tables rather than rich's 80.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

DEBUG_FLAG = "--debug"
# The reference's detections that count as ground truth: confident ones. The candidate keeps every box
# down to the model's own score floor (0.05), so a box scoring 0.31 in FP32 and 0.29 in INT8 still
# matches; with the reference at the floor too, every box near 0.05 that a precision change moves
# across it counts as a miss, though no user keeps such boxes.
FIDELITY_MIN_SCORE = 0.3  # eval --fidelity-score; a constant here, so the CLI starts without numpy
MAX_SIGN_FLIPS = 1e-3  # quantize --max-sign-flips (quant.binary_inputs), here for the same reason

MethodOpt = Annotated[str, typer.Option("--method", "-m", help=f"Method to build: {', '.join(method_names())}.")]
CheckpointOpt = Annotated[
    Path | None, typer.Option(help="Trained weights (.pth, upstream key names). Default: seeded random weights.")
]
InputSizeOpt = Annotated[str | None, typer.Option(help="HEIGHTxWIDTH of the input image, e.g. 800x1333.")]
ScaleOpt = Annotated[int | None, typer.Option(help="ThumbDet down-sampling: 4 (default), 2, or 1 (no thumbnail).")]
VariantOpt = Annotated[str | None, typer.Option(help="Named recipe variant (see `tod-deploy methods`).")]
PresetOpt = Annotated[str | None, typer.Option(help="SR-TOD data-set preset: aitod, visdrone, droneswarms.")]
BackboneOpt = Annotated[
    str | None, typer.Option(help="Backbone (bottom-heavy method): bh_resnet50, bh_hrnet32, bh_hrnet18, resnet50, ...")
]
DetectorOpt = Annotated[
    str | None, typer.Option(help="Detector: faster_rcnn, cascade_rcnn, retinanet (SR-TOD); fcos (DFR-Det).")
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the full result as JSON to this file.")]
OpenVINOPrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="OpenVINO's inference precision: fp32, bf16 (CPUs with native BF16) or auto (OpenVINO's CPU default).",
    ),
]


def log(message: str) -> None:
    err.print(message, markup=False)


def variant_of(scale: int | None, variant: str | None, preset: str | None = None) -> str | None:
    """--scale N and --preset P are friendlier names for recipe variants."""
    given = [v for v in (f"{scale}x" if scale is not None else None, preset, variant) if v is not None]
    if len(given) > 1:
        raise UserError("more than one of --scale, --preset and --variant given", "use one of them")
    return given[0] if given else None


def model_overrides(detector: str | None, backbone: str | None = None) -> dict[str, Any]:
    model = {key: value for key, value in (("detector", detector), ("backbone", backbone)) if value}
    return {"model": model} if model else {}


def write_json(path: Path | None, data: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {path}")


def parity_table(report: Any) -> Table:
    n = report.excused_flips
    flips = f", {n} excused flip{'s' if n != 1 else ''}" if n else ""
    title = f"parity: {report.backend} vs {report.reference} on {report.inputs} seeded inputs{flips}"
    table = Table(title=title)
    for column in ("output", "max abs err", "max rel err", "atol / rtol", "failing", "result"):
        table.add_column(column, justify="right" if column != "output" else "left")

    def add(o: Any, result: str = "") -> None:
        verdict = ("ok" if o.ok else "FAIL") + (f" ({result})" if result else "")
        tolerance = f"{o.atol:g} / {o.rtol:g}"
        table.add_row(o.name, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", tolerance, f"{o.failing}/{o.total}", verdict)

    for o in report.outputs:
        add(o)
    for d in report.decisions:
        add(d.input, d.flips_line() if d.output is None else "")
        if d.output is not None:
            add(d.output, f"teacher-forced, {d.flips_line()}")
    for d in [*report.selections, *([report.detections] if report.detections is not None else [])]:
        excused = []
        if d.near_ties:
            excused.append(f"{d.near_ties} NMS near-ties")
        if d.cascaded:
            excused.append(f"{d.cascaded} changed by them")
        table.add_row(
            d.name, f"IoU min {d.min_iou:.4f}", f"score diff {d.max_score_diff:.2g}",
            f"IoU>={d.min_iou_required} / {d.score_tol:g}",
            f"{d.checked - d.matched - d.near_ties - d.cascaded}/{d.checked}",
            ("ok" if d.ok else "FAIL") + (f" ({', '.join(excused)})" if excused else ""),
        )  # fmt: skip
    return table


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option(DEBUG_FLAG, help="Show tracebacks for errors.")] = False,
) -> None:
    """Deploy tiny-object detectors (ThumbDet, SR-TOD, DFR-Det, CFINet, bottom-heavy backbones)."""


@app.command("methods")
def methods_cmd() -> None:
    """List the methods and their recipe variants."""
    from tod_deploy.recipes import load_recipe
    from tod_deploy.registry import all_methods

    table = Table(title="methods")
    for column in ("method", "variants", "input", "summary"):
        table.add_column(column)
    for spec in all_methods():
        recipe = load_recipe(spec.name)
        variants = ", ".join(_variants(spec.name))
        table.add_row(spec.name, variants, "x".join(map(str, recipe.input_size)), spec.summary)
    out.print(table)


def _variants(method: str) -> list[str]:
    import yaml

    from tod_deploy.recipes import recipe_dir

    return sorted((yaml.safe_load((recipe_dir() / f"{method}.yaml").read_text()) or {}).get("variants", {}))


@app.command("export")
def export_cmd(
    method: MethodOpt,
    checkpoint: CheckpointOpt = None,
    output: Annotated[Path, typer.Option(help="Directory for <name>.onnx and <name>.json.")] = Path("artifacts"),
    input_size: InputSizeOpt = None,
    scale: ScaleOpt = None,
    preset: PresetOpt = None,
    detector: DetectorOpt = None,
    backbone: BackboneOpt = None,
    variant: VariantOpt = None,
    batch: Annotated[str | None, typer.Option(help="Batch size baked in (e.g. 1), or 'dynamic'.")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default from the recipe).")] = None,
    binary_conv: Annotated[
        str | None,
        typer.Option(
            help="1-bit layers as tod::BinaryConv2d nodes with the residual Add and PReLU/ReLU after them fused "
            "in ('plugin', default), the same without that fusion ('plugin-unfused'), or standard ops ('decompose')."
        ),
    ] = None,
    raw: Annotated[bool, typer.Option(help="Keep the head outputs instead of the detection contract.")] = False,
    top_k: Annotated[int | None, typer.Option(help="Detections per image, K (default from the recipe).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights when no checkpoint is given.")] = 0,
    verify: Annotated[bool, typer.Option(help="Check onnxruntime against PyTorch before writing.")] = True,
    name: Annotated[str | None, typer.Option(help="File stem (default: the method, plus variant).")] = None,
    classes: Annotated[
        Path | None, typer.Option(help="Class names, one per line in label order (default: the checkpoint's).")
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Class count (default: read from the checkpoint's classifier, else the recipe).")
    ] = None,
    extra_outputs: Annotated[
        str | None, typer.Option(help="Comma-separated extra outputs to keep, e.g. diff_map,binary_mask (SR-TOD).")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """PyTorch -> inference graph -> ONNX, verified against PyTorch, written with a JSON sidecar."""
    from tod_deploy.recipes import load_recipe
    from tod_deploy.registry import check_method_name

    overrides: dict[str, Any] = model_overrides(detector, backbone)
    if input_size is not None:
        overrides["input_size"] = input_size
    if batch is not None:
        overrides["batch"] = batch
    if opset is not None:
        overrides["opset"] = opset
    if binary_conv is not None:
        overrides["binary_conv"] = binary_conv
    if top_k is not None:
        overrides["top_k"] = top_k
    if num_classes is not None:
        overrides.setdefault("model", {})["num_classes"] = num_classes
    if classes is not None:
        from tod_deploy.checkpoint_settings import read_class_names

        overrides["classes"] = read_class_names(classes)
    extras = tuple(e.strip() for e in (extra_outputs or "").split(",") if e.strip())
    if "diff_map" in extras and "binary_mask" not in extras:
        extras = (*extras, "binary_mask")  # the mask is what users look at beside the map
    # A mistyped method or flag is refused before torch loads (2.6 s of a 4.6 s refusal otherwise).
    check_method_name(method)
    recipe_variant = variant_of(scale, variant, preset)
    load_recipe(method, recipe_variant, {k: v for k, v in overrides.items() if k != "classes"})
    from tod_deploy.export.pipeline import export_model

    result = export_model(
        method, output, checkpoint, recipe_variant, overrides, raw, seed, verify, name, extras, log=log
    )  # fmt: skip
    if result.verification is not None:
        out.print(parity_table(result.verification))
    info = result.sidecar
    out.print(
        f"wrote {result.onnx_path} ({info['onnx']['bytes'] / 1e6:.1f} MB, {info['onnx']['nodes']} nodes, "
        f"{info['model']['parameters'] / 1e6:.2f} M parameters) and {result.sidecar_path.name}"
    )
    write_json(json_path, info.to_dict())


@app.command("verify")
def verify_cmd(
    model: Annotated[
        Path, typer.Argument(help="An .onnx written by tod-deploy export, or an .engine written by build-engine.")
    ],
    atol: Annotated[float, typer.Option(min=0.0, help="Absolute tolerance.")] = 1e-4,
    rtol: Annotated[float, typer.Option(min=0.0, help="Relative tolerance.")] = 1e-3,
    reference: Annotated[
        Path | None, typer.Option(help="For an .engine: the .onnx to compare with (default: its source).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads of the runtime and of PyTorch (default: all cores).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="Runtime that reads an .onnx: onnxruntime or openvino (PyTorch is the reference).")
    ] = "onnxruntime",
    precision: OpenVINOPrecisionOpt = "fp32",
    json_path: JsonOpt = None,
) -> None:
    """Re-run parity: an .onnx on onnxruntime or OpenVINO against PyTorch, an .engine (TensorRT) against its
    ONNX in onnxruntime. OpenVINO in bfloat16 is judged by the quantized files' tolerances (a report)."""
    from tod_deploy.export.pipeline import reverify

    if model.suffix == ".engine":
        from tod_deploy.trt.verify import verify_engine

        report = verify_engine(model, reference, atol, rtol, log=log)
    else:
        from tod_deploy.backends import parse_backends

        runtimes = parse_backends(backend, "onnxruntime")
        if runtimes not in (["onnxruntime"], ["openvino"]):
            raise UserError(f"verify cannot run an .onnx on {backend!r}", "use --backend onnxruntime or openvino")
        report = reverify(model, atol, rtol, threads=threads, log=log, backend=runtimes[0], precision=precision)
    out.print(parity_table(report))
    write_json(json_path, report.to_dict())
    if not report.ok:
        raise UserError(
            f"verification failed: {report.failure()}",
            "re-export the model with tod-deploy export (the table above shows every row)",
        )


@app.command("bench")
def bench_cmd(
    model: Annotated[
        Path | None, typer.Argument(help="An .onnx written by tod-deploy export, or an .engine (TensorRT).")
    ] = None,
    fps: Annotated[bool, typer.Option("--fps", help="Report throughput (the default measurement).")] = True,
    backend: Annotated[
        str, typer.Option(help="Comma-separated: torch, onnxruntime, openvino, tensorrt.")
    ] = "torch,onnxruntime",
    precision: OpenVINOPrecisionOpt = "auto",
    batch: Annotated[int, typer.Option(min=1, help="Images per call.")] = 1,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls per backend first.")] = 3,
    iters: Annotated[int | None, typer.Option(min=1, help="Timed calls per backend.")] = None,
    duration: Annotated[float | None, typer.Option(min=0.1, help="Time budget in seconds instead of --iters.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    cuda_graph: Annotated[
        bool, typer.Option("--cuda-graph", help="TensorRT: replay the engine's launches as one CUDA graph.")
    ] = False,
    triton: Annotated[
        str | None, typer.Option(help="Load a model served by Triton at this URL instead (e.g. localhost:8000).")
    ] = None,
    served_model: Annotated[str | None, typer.Option("--model", help="With --triton: the served model's name.")] = None,
    concurrency: Annotated[str, typer.Option(help="With --triton: concurrent clients, e.g. 1,2,4,8.")] = "1,2,4,8",
    protocol: Annotated[str, typer.Option(help="With --triton: http or grpc.")] = "http",
    requests: Annotated[
        int | None, typer.Option(min=1, help="With --triton: requests per client per concurrency (default: 10 s each).")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Latency percentiles and FPS per backend, measured side by side, with ratios.

    With --triton URL --model NAME: load on a served model instead (like perf_analyzer), each
    concurrency in turn for --requests per client or --duration seconds: throughput, p50/p90/p99
    latency, failed requests, and how many requests each model execution served (dynamic batching).
    """
    from tod_deploy.backends import parse_backends
    from tod_deploy.bench.report import bench_table
    from tod_deploy.bench.run import bench_model

    if iters is not None and duration is not None:
        raise UserError("--iters and --duration both given", "use one of them")
    if triton is not None:
        _bench_served(triton, served_model, model, concurrency, protocol, requests, duration, json_path)
        return
    if model is None:
        raise UserError("no model given", "pass an .onnx or .engine, or --triton URL --model NAME")
    if iters is None and duration is None:
        iters = 20
    backends = parse_backends(backend, "torch,onnxruntime")
    report = bench_model(
        model, backends, batch, warmup, iters, duration, threads, log=log, cuda_graph=cuda_graph, precision=precision
    )
    out.print(bench_table(report))
    write_json(json_path, report.to_dict())


def _bench_served(
    url: str,
    name: str | None,
    model_file: Path | None,
    concurrency: str,
    protocol: str,
    requests: int | None,
    duration: float | None,
    json_path: Path | None,
) -> None:
    from tod_deploy.bench.report import load_table
    from tod_deploy.bench.triton_load import run_load

    if name is None or model_file is not None:
        raise UserError("--triton takes the served model's name, not a file", "pass --triton URL --model NAME")
    parts = [c.strip() for c in concurrency.split(",") if c.strip()]
    if not parts or not all(c.isdigit() and int(c) > 0 for c in parts):
        raise UserError(f"--concurrency {concurrency!r} is not positive integers", "e.g. --concurrency 1,2,4,8")
    levels = [int(c) for c in parts]
    if requests is not None and duration is not None:
        raise UserError("--requests and --duration both given", "use one of them")
    if requests is None and duration is None:
        duration = 10.0  # per concurrency, as perf_analyzer measures windows of time
    report = run_load(url, name, levels, protocol=protocol, requests_per_client=requests, duration_s=duration, log=log)
    out.print(load_table(report))
    write_json(json_path, report.to_dict())


@app.command("package")
def package_cmd(
    model: Annotated[Path, typer.Argument(help="An .onnx (export or quantize) or an .engine, with its sidecar.")],
    triton: Annotated[Path, typer.Option(help="Triton model repository to write into (created if missing).")],
    name: Annotated[str | None, typer.Option(help="Model name in the repository (default: the file's stem).")] = None,
    backend: Annotated[
        str, typer.Option(help="auto (engine: tensorrt, tod ops: python, else onnxruntime), python, onnxruntime.")
    ] = "auto",
    max_batch: Annotated[int, typer.Option(help="Largest batch the dynamic batcher forms.")] = 8,
    queue_delay_us: Annotated[int, typer.Option(help="Dynamic batching: longest wait for a fuller batch, us.")] = 500,
    instances: Annotated[int, typer.Option(help="Model instances (instance_group count).")] = 1,
    device: Annotated[str, typer.Option(help="cpu or gpu (instance_group kind).")] = "cpu",
    accelerator: Annotated[
        str, typer.Option(help="onnxruntime backend on a GPU: none (CUDA), or tensorrt (its TensorRT EP).")
    ] = "none",
    threads: Annotated[int, typer.Option(help="python backend: onnxruntime threads per instance (0: all).")] = 0,
    with_preprocess: Annotated[
        bool,
        typer.Option("--with-preprocess", help="Add an ensemble taking JPEG/PNG bytes, answering in image pixels."),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace models of the same name.")] = False,
    json_path: JsonOpt = None,
) -> None:
    """Write a Triton Inference Server model repository for an export or engine.

    config.pbtxt comes from the sidecar (I/O, batching, instances) and is checked against Triton's
    own model-config schema before anything is written; each model directory appears complete or
    not at all. Serve it with `tod-deploy serve REPO`, load it with `tod-deploy bench --triton`.
    """
    from tod_deploy.targets.triton import TritonOptions, plan_repository, write_repository

    options = TritonOptions(
        name=name, backend=backend, max_batch=max_batch, instances=instances, device=device,
        accelerator=accelerator, queue_delay_us=queue_delay_us, threads=threads, with_preprocess=with_preprocess,
    )  # fmt: skip
    plan = plan_repository(model, options)
    written = write_repository(plan, triton, overwrite=overwrite)
    table = Table(title=f"Triton model repository {triton}")
    for column in ("model", "runs on", "max batch", "inputs", "outputs"):
        table.add_column(column)
    for entry in plan.models:
        config = entry.config
        table.add_row(
            entry.name, entry.kind, str(config.max_batch_size), ", ".join(t.name for t in config.input),
            ", ".join(t.name for t in config.output),
        )  # fmt: skip
    out.print(table)
    for note in plan.notes:
        out.print(f"note: {note}")
    out.print(f"wrote {len(written)} model(s); clients call {plan.entry!r}. Serve with: tod-deploy serve {triton}")
    write_json(json_path, plan.to_dict())


@app.command("serve")
def serve_cmd(
    repository: Annotated[Path, typer.Argument(help="A Triton model repository (tod-deploy package --triton).")],
    http_port: Annotated[int, typer.Option(help="HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every model to be ready.")] = 120.0,
) -> None:
    """Start Triton Inference Server on a repository, wait until it is ready, serve until Ctrl-C.

    Uses the tritonserver the serve extra bundles (CPU, python backend) or one on PATH; the python
    models run in this Python environment. A model the server cannot load is one line with the fix.
    """
    import signal
    import time

    from tod_deploy.targets.triton_server import Ports, TritonServer

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C, and SIGTERM from a service manager, stop the server (even where a shell ignored SIGINT)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    ports = Ports(http_port, grpc_port, metrics_port)
    server = TritonServer(repository, ports, host=host)
    log(f"starting tritonserver on {repository} ...")
    with server.start(timeout):
        table = Table(title=f"Triton Inference Server: {repository} (log: {server.log_path})")
        table.add_column("endpoint")
        table.add_column("address")
        for kind, address in ports.endpoints("localhost" if host in ("127.0.0.1", "0.0.0.0") else host).items():
            table.add_row(kind, address)
        try:  # from the moment "ready" is printed, Ctrl-C is a clean stop (the test sends it as soon as it reads it)
            out.print(table)
            out.print("ready; Ctrl-C stops the server", markup=False)
            while server.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            server.stop()
            log("stopped tritonserver")
            return
        raise UserError(f"tritonserver stopped by itself (log: {server.log_path})", "read the log, then serve again")


@app.command("build-engine")
def build_engine_cmd(
    model: Annotated[Path, typer.Argument(help="An .onnx written by tod-deploy export (its .json gives defaults).")],
    min_shape: Annotated[
        str | None, typer.Option("--min", help="Smallest input shape, e.g. 1x3x800x800 (or images:1x3x800x800).")
    ] = None,
    opt_shape: Annotated[str | None, typer.Option("--opt", help="Shape TensorRT tunes for (default: --min).")] = None,
    max_shape: Annotated[str | None, typer.Option("--max", help="Largest input shape the engine accepts.")] = None,
    workspace: Annotated[float, typer.Option(min=0.01, help="Builder scratch memory limit, GiB.")] = 4.0,
    timing_cache: Annotated[
        Path | None, typer.Option(help="Timing cache file: read if present, written after the build (faster rebuilds).")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Engine file (default: the model's name with .engine).")] = None,
    plan_only: Annotated[
        bool, typer.Option("--plan-only", help="Print (with --json: write) the build plan; needs no TensorRT or GPU.")
    ] = False,
    json_path: JsonOpt = None,
) -> None:
    """ONNX -> TensorRT 11 engine (strongly typed: precision comes from the ONNX), with the tod plugins.

    Writes <name>.engine and <name>.engine.json (the plan and the engine's layer/precision summary)
    together or not at all. Profiles default to the export: its H x W, and batch 1..8 if the batch is
    dynamic. --plan-only shows what would be built, on any machine.
    """
    from tod_deploy.trt.builder import build_engine, plan_build

    plan = plan_build(model, output, min_shape, opt_shape, max_shape, workspace, timing_cache)
    out.print(plan.describe())
    if plan_only:
        write_json(json_path, plan.to_dict())
        return
    result = build_engine(plan, log=log)
    layers = result.sidecar["layers"]
    precisions = ", ".join(f"{name} {count}" for name, count in layers["by_precision"].items())
    out.print(
        f"wrote {result.engine_path} ({result.sidecar['engine']['bytes'] / 1e6:.1f} MB, {layers['layers']} layers: "
        f"{precisions}) and {result.sidecar_path.name}"
    )
    write_json(json_path, result.sidecar.to_dict())


@app.command("inspect")
def inspect_cmd(
    method: MethodOpt,
    input_size: InputSizeOpt = None,
    scale: ScaleOpt = None,
    preset: PresetOpt = None,
    detector: DetectorOpt = None,
    backbone: BackboneOpt = None,
    variant: VariantOpt = None,
    checkpoint: CheckpointOpt = None,
    backbone_only: Annotated[
        bool, typer.Option("--backbone-only", help="Count the backbone alone (as backbone papers' tables do).")
    ] = False,
    json_path: JsonOpt = None,
) -> None:
    """Parameters and multiply-adds (the papers' "GFLOPs") of the deploy model, vs the paper."""
    from tod_deploy.inspection import inspect_method, inspect_table

    overrides = model_overrides(detector, backbone) | ({"input_size": input_size} if input_size else {})
    variant_name = variant_of(scale, variant, preset)
    result = inspect_method(method, variant_name, overrides, checkpoint, log=log, backbone_only=backbone_only)
    out.print(inspect_table(result))
    write_json(json_path, result)


@app.command("visualize")
def visualize_cmd(
    model: Annotated[Path, typer.Argument(help="An .onnx exported with --extra-outputs diff_map.")],
    image: Annotated[Path, typer.Option(help="Image file (PNG/JPEG); resized to the model's input size.")],
    out: Annotated[Path, typer.Option(help="Directory for the PNG files.")] = Path("artifacts/visualize"),
) -> None:
    """Save a model's extra outputs (SR-TOD's difference map and binary mask) as PNG images."""
    from tod_deploy.visualize import save_extra_outputs

    for path in save_extra_outputs(model, image, out):
        out_line = f"wrote {path}"
        log(out_line)


@app.command("check")
def check_cmd(
    model: Annotated[Path, typer.Argument(help="An .onnx file (ours or any other exporter's).")],
    target: Annotated[str, typer.Option(help="Runtime to check against: tensorrt (TensorRT 11).")] = "tensorrt",
    json_path: JsonOpt = None,
) -> None:
    """Would TensorRT build this ONNX? Nodes its parser would not take (with the fix) and plugins the engine needs.

    Checks every node against TensorRT 11's ONNX operator table (tod_deploy/trt/onnx_support.json, with its
    source) and the restrictions that bite detectors (TopK's K <= 3840, NMS's 5000-box limit, Resize/GridSample/
    RoiAlign modes, DeformConv pads, Q/DQ zero points). Runs without TensorRT. Exit status 0: it would build
    (warnings are printed but do not fail); 1: some node would not; 2: unreadable file or unknown target.
    """
    from tod_deploy.trt.support import check_model, check_tables, summary_line

    report = check_model(model, target)
    for table in check_tables(report):
        out.print(table)
    out.print(summary_line(report))
    write_json(json_path, report.to_dict())
    if not report.ok:
        sys.exit(1)


@app.command("doctor")
def doctor_cmd(
    gpu: Annotated[
        bool,
        typer.Option(
            "--gpu",
            help="Also compile the 1-bit CUDA kernel for this GPU, check it bit-exactly against the NumPy reference "
            "and time it against cuDNN (needs an NVIDIA GPU, not TensorRT; meant to take under two minutes).",
        ),
    ] = False,
    gpu_report: Annotated[Path, typer.Option("--gpu-report", help="JSON report of --gpu.")] = Path("doctor-gpu.json"),
    json_path: JsonOpt = None,
) -> None:
    """What this machine can run: CPU and its 1-bit kernel path, onnxruntime, torch, GPU and driver,
    nvcc/NVRTC, TensorRT, and which bench backends work (with what to install for the others).

    Exit status 0; with --gpu: 1 if any kernel output differs from the reference, 2 without a GPU.
    """
    from tod_deploy.doctor import doctor_report, doctor_tables

    report = doctor_report()
    if gpu:
        from tod_deploy.trt.gpu_selftest import require_gpu

        require_gpu(report.gpu)  # before any output: without a GPU, --gpu is one error line
    for table in doctor_tables(report):
        out.print(table)
    write_json(json_path, report.to_dict())
    if not gpu:
        return
    from tod_deploy.trt.gpu_selftest import run_selftest, selftest_tables, summary_line, write_report

    result = run_selftest(report.gpu, log=log)
    write_report(result, gpu_report)
    log(f"wrote {gpu_report}")
    for table in selftest_tables(result):
        out.print(table)
    out.print(summary_line(result))
    if not result.ok:
        sys.exit(1)


@app.command("quantize")
def quantize_cmd(
    model: Annotated[Path, typer.Argument(help="An FP32 .onnx written by tod-deploy export (its .json beside it).")],
    precision: Annotated[
        str, typer.Option(metavar="fp16|int8", help="fp16 (autocast) or int8 (symmetric Q/DQ, calibrated on the CPU).")
    ],
    calib: Annotated[
        str | None,
        typer.Option(
            metavar="DIR", help="Calibration images: a folder (manifest.json optional) or a set under calibration/."
        ),
    ] = None,
    calib_size: Annotated[
        int | None, typer.Option(help="Samples to calibrate on (default: each image once; more adds seeded crops).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            metavar="entropy|max|percentile|mse",
            help="INT8 calibration: entropy (KL, as TensorRT's calibrator), max, percentile (99.999%), or mse "
            "(the range with the least squared rounding and clipping error). Default: entropy for --target "
            "tensorrt, mse for --target onnxruntime.",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            metavar="REGEX", help="Node-name regex to keep in FP32 (repeatable); one matching no node is an error."
        ),
    ] = None,
    report: Annotated[
        bool,
        typer.Option("--report", help="INT8: per-layer sensitivity (each layer quantized alone) and --exclude hints."),
    ] = False,
    report_limit: Annotated[
        int | None, typer.Option(help="--report: measure only the first N layers in graph order.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sampling: same seed and set, same scales.")] = 0,
    target: Annotated[
        str,
        typer.Option(
            metavar="tensorrt|onnxruntime", help="INT8 layout: for TensorRT engines, or for onnxruntime on the CPU."
        ),
    ] = "tensorrt",
    max_sign_flips: Annotated[
        float,
        typer.Option(
            metavar="SHARE",
            help="INT8, 1-bit models: a real layer feeding 1-bit layers runs in INT8 if it alone flips at most this "
            "share of their input signs (0: keep them all FP32).",
        ),
    ] = MAX_SIGN_FLIPS,
    weight_bits: Annotated[
        int | None,
        typer.Option(
            metavar="7|8",
            help="INT8 weights, --target onnxruntime: 7 (default) computes the same on every x86 CPU; 8 is more "
            "accurate (SR-TOD's fidelity 92.1 -> 93.9) but exact only on CPUs with VNNI or AMX (Intel Cascade Lake, "
            "AMD Zen 4 and later): without, onnxruntime's 16-bit partial sums saturate.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output file (default: <stem>.fp16.onnx / <stem>.int8.onnx).")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """FP16 or INT8 ONNX for TensorRT 11 (strongly typed) or onnxruntime, with its error against FP32.

    FP16 keeps post-processing (box decoding, TopK, NMS, RoiAlign coordinates), tod nodes and large-range
    tensors in FP32. INT8 keeps the stem, the last layer of each head, threshold inputs and tod nodes in FP32,
    and a real layer feeding 1-bit layers unless, quantized alone, it keeps their input signs (--max-sign-flips);
    --target tensorrt puts symmetric Q/DQ (zero point 0) around Conv/MatMul/Gemm, --target onnxruntime also
    around the adds, pooling, resizes and concats between them (uint8 activations, 7- or 8-bit weights), so that
    onnxruntime's CPU kernels stay in integers. Writes <stem>.<precision>.onnx and its .json together.
    """
    from tod_deploy.quant.pipeline import quantize_model
    from tod_deploy.quant.report import (
        comparison_table,
        sensitivity_table,
        sqnr_suggestion_line,
        sqnr_table,
        suggestion_line,
        summary_line,
        to_json,
    )

    result = quantize_model(
        model, precision, calib, calib_size, method, tuple(exclude or ()), seed, output, report, report_limit, log=log,
        show_progress=err.is_terminal, target=target, max_sign_flips=max_sign_flips, weight_bits=weight_bits,
    )  # fmt: skip
    out.print(comparison_table(result))
    if result.sensitivity is not None:
        out.print(sensitivity_table(result.sensitivity))
        out.print(suggestion_line(result.sensitivity), soft_wrap=True)  # one line, to paste whole
        out.print(sqnr_table(result.sensitivity))
        out.print(sqnr_suggestion_line(result.sensitivity), soft_wrap=True)
    out.print(summary_line(result))
    write_json(json_path, to_json(result))


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Option(help="COCO-format annotation JSON (images, annotations, categories).")],
    images: Annotated[Path, typer.Option(help="Folder holding the images named in --data.")],
    model: Annotated[
        Path | None, typer.Argument(help="An .onnx written by tod-deploy export (its .json beside it).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method", "-m", help=f"Evaluate this method's PyTorch model, not a file: {', '.join(method_names())}."
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: torch, onnxruntime, openvino (default: onnxruntime for a file, torch for --method)."
        ),
    ] = None,
    precision: OpenVINOPrecisionOpt = "auto",
    class_agnostic: Annotated[
        bool, typer.Option(help="Score boxes whatever their label (e.g. random-weight models on a 1-class set).")
    ] = False,
    max_images: Annotated[int | None, typer.Option(help="Evaluate only the first N images of --data.")] = None,
    max_dets: Annotated[int, typer.Option(help="Detections per image that count (COCO maxDets).")] = 100,
    checkpoint: CheckpointOpt = None,
    input_size: Annotated[str | None, typer.Option(help="HEIGHTxWIDTH for --method (a file fixes its own).")] = None,
    compare: Annotated[
        list[Path] | None,
        typer.Option(help="Another export of the model (e.g. model.int8.onnx) as an extra onnxruntime row; repeat."),
    ] = None,
    fidelity: Annotated[
        bool, typer.Option(help="Also score every row against the FP32 onnxruntime row's detections (no labels).")
    ] = False,
    fidelity_score: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Reference detections scoring at least this count as ground truth.")
    ] = FIDELITY_MIN_SCORE,
    noise_floor: Annotated[
        bool,
        typer.Option(
            help="Also run the reference on each image changed by at most one grey level per pixel (seeded): the "
            "fidelity so small a change costs, to read the other rows against (implies --fidelity; not gated)."
        ),
    ] = False,
    min_ap50: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Exit 1 if any row's AP50 is below this fraction (e.g. 0.5): a CI gate."),
    ] = None,
    min_fidelity: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Exit 1 if any row's fidelity AP50 is below this (implies --fidelity)."),
    ] = None,
    json_path: JsonOpt = None,
    plot: Annotated[Path | None, typer.Option(help="Also draw a bar plot of the table to this PNG file.")] = None,
) -> None:
    """Tiny-object AP (AP, AP50, AP75 and the AI-TOD bins vt/t/s/m) of a model on every backend, in one table."""
    from tod_deploy.evaluation.gate import check_floors
    from tod_deploy.evaluation.report import eval_table, fidelity_table, write_plot
    from tod_deploy.evaluation.run import evaluate_model, score_fidelity

    report = evaluate_model(
        model, data, images, method, backend, max_images, class_agnostic, max_dets, checkpoint, input_size, log=log,
        compare=compare, precision=precision, noise_floor=noise_floor,
    )  # fmt: skip
    out.print(eval_table(report))  # before fidelity, which can fail (nothing at --fidelity-score): AP is still shown
    if fidelity or noise_floor or min_fidelity is not None:
        score_fidelity(report, fidelity_score)
    failures = check_floors(report, min_ap50, min_fidelity)
    agreement = fidelity_table(report)
    if agreement is not None:
        out.print(agreement)
    result = report.to_dict()
    if min_ap50 is not None or min_fidelity is not None:
        result["gate"] = {"min_ap50": min_ap50, "min_fidelity": min_fidelity, "failed": [f.to_dict() for f in failures]}
    write_json(json_path, result)
    if plot is not None:
        log(f"wrote {write_plot(report.results, plot, f'{report.method} on {data.name}: AP per backend (%)')}")
    for failure in failures:
        log(f"below the floor: {failure.line()}")
    if failures:
        raise typer.Exit(1)


dataset_app = typer.Typer(
    help="Write a data set for tests and demos.", no_args_is_help=True, add_completion=False, rich_markup_mode=None
)
app.add_typer(dataset_app, name="make-dataset")


@dataset_app.command("synthetic")
def make_synthetic_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="New folder for images/ and annotations.json.")],
    images: Annotated[int, typer.Option(help="Number of images.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same files, byte for byte.")] = 0,
    size: Annotated[str, typer.Option(help="HEIGHTxWIDTH of every image.")] = "512x512",
    backgrounds: Annotated[
        Path | None, typer.Option(help="Folder of photos to crop backgrounds from (default: calibration/photos).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a data set already in --out.")] = False,
    json_path: JsonOpt = None,
) -> None:
    """Tiny objects (2-64 px) drawn on real photos, with COCO annotations.

    Object sizes are spread evenly over the AI-TOD bins (very tiny 2-8, tiny 8-16, small 16-32,
    medium 32-64 px on sqrt(area)); writes OUT/images/*.png and OUT/annotations.json.
    """
    from tod_deploy.evaluation.synthetic import generate_synthetic
    from tod_deploy.recipes import parse_input_size

    result = generate_synthetic(out_dir, images, seed, parse_input_size(size), backgrounds, overwrite=overwrite)
    bins = ", ".join(f"{name} {count}" for name, count in result.per_bin.items())
    out.print(f"wrote {result.annotations} and {result.images} images ({result.objects} objects: {bins})")
    write_json(json_path, result.to_dict())


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2 (tracebacks with --debug)."""
    debug = DEBUG_FLAG in sys.argv[1:]
    if debug:
        sys.argv.remove(DEBUG_FLAG)
    try:
        status = app(standalone_mode=False)  # typer.Exit(n) comes back as n here, not as SystemExit
        if isinstance(status, int) and status:
            sys.exit(status)
    except UserError as exc:
        if debug:
            raise
        err.print(f"error: {exc.line()}", markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted: nothing was left half-written", markup=False)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # a usage error from typer's parser, or a bug: one line unless --debug
        if isinstance(exc, typer.TyperException) and hasattr(exc, "show"):
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        if debug:
            raise
        err.print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", markup=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
