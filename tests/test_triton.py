"""Serving on a real Triton Inference Server: repositories written by ``package --triton``, served by the
tritonserver binary the serve extra bundles, on loopback ports, with Triton's own HTTP and gRPC clients.

Nothing here fakes the server: the python models run tod-deploy's onnxruntime session inside Triton's
Python backend, batching is Triton's dynamic batcher, errors are the server's responses. The
TensorRT and onnxruntime backends are not in the bundle; their repositories are checked against
Triton's model-config schema, and serving them shows the server's own "backend not found".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from test_cli import assert_one_line_error, run
from tritonclient.grpc import model_config_pb2 as mc

from tod_deploy.artifacts import Sidecar, sidecar_path, write_json
from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner, load_onnx
from tod_deploy.bench.triton_load import Client, encode_png, run_load
from tod_deploy.errors import UserError
from tod_deploy.evaluation.datasets import letterbox
from tod_deploy.export.pipeline import ExportResult, export_model
from tod_deploy.export.verify import plan_for
from tod_deploy.parity.comparator import compare, verification_images
from tod_deploy.parity.detections import DetectionRule, agree_detections, new_agreement
from tod_deploy.parity.policy import FP32
from tod_deploy.targets.triton import TritonOptions, plan_repository, write_repository
from tod_deploy.targets.triton_python import DetectorStep, PostprocessStep, PreprocessStep, RequestError
from tod_deploy.targets.triton_server import Ports, TritonServer, startup_failure

CONTRACT = ("num_dets", "boxes", "scores", "labels")


def leftover_processes(repository: Path) -> list[str]:
    """tritonserver or Python-backend stubs still running on ``repository`` (read from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(repository.resolve()) in cmdline and ("tritonserver" in cmdline or "backend_stub" in cmdline):
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


@pytest.fixture(scope="module")
def dfr_det_plugin(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("dfr_det_serve")
    overrides = {"input_size": "256x256", "binary_conv": "plugin", "batch": "dynamic", "top_k": 100}
    return export_model("dfr_det", out, overrides=overrides, log=lambda _line: None)


@pytest.fixture(scope="module")
def repository(
    tmp_path_factory: pytest.TempPathFactory, small_export: ExportResult, dfr_det_plugin: ExportResult
) -> Path:
    """ThumbDet (a batch-1 export, python backend) and DFR-Det (tod::BinaryConv2d, dynamic batch), each raw
    and with --with-preprocess, written by the CLI as a user runs it."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    for args in (
        (str(small_export.onnx_path), "--backend", "python", "--with-preprocess"),
        (str(dfr_det_plugin.onnx_path), "--with-preprocess", "--max-batch", "8", "--queue-delay-us", "20000"),
    ):
        proc = run("package", *args, "--triton", str(repo))
        assert proc.returncode == 0, proc.stderr
        assert "Serve with: tod-deploy serve" in proc.stdout
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> TritonServer:
    with TritonServer(repository, Ports.free()) as started:
        yield started
    assert leftover_processes(repository) == []


def url(server: TritonServer, protocol: str) -> str:
    return f"127.0.0.1:{server.ports.http if protocol == 'http' else server.ports.grpc}"


class ServedRunner:
    """A served model as a parity Runner: the comparator judges it like any backend."""

    def __init__(self, server: TritonServer, protocol: str, model: str) -> None:
        self.backend = f"triton {protocol}"
        self.client = Client(url(server, protocol), protocol)
        self.model = model

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        answer = self.client.infer(self.model, {"images": images}, list(CONTRACT))
        return {**answer, "num_dets": answer["num_dets"].reshape(-1)}


# ------------------------------------------------------------------ the repository, without a server


def test_every_config_reads_back_with_tritons_schema(repository: Path, small_export: ExportResult) -> None:
    configs = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        configs[path.parent.name] = text_format.Parse(path.read_text(), mc.ModelConfig())
        assert (path.parent / "1").is_dir()
    assert set(configs) == {
        f"{base}{suffix}"
        for base in ("thumbdet", "dfr_det_fcos")
        for suffix in ("", "_preprocess", "_postprocess", "_ensemble")
    }
    det = configs["dfr_det_fcos"]
    assert det.backend == "python" and det.max_batch_size == 8
    assert [list(t.dims) for t in det.input] == [[3, 256, 256]]
    assert {t.name: list(t.dims) for t in det.output} == {
        "num_dets": [1],
        "boxes": [100, 4],
        "scores": [100],
        "labels": [100],
    }
    assert list(det.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert det.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    ensemble = configs["dfr_det_fcos_ensemble"]
    assert ensemble.platform == "ensemble" and ensemble.input[0].data_type == mc.TYPE_STRING
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        "dfr_det_fcos_preprocess", "dfr_det_fcos", "dfr_det_fcos_postprocess"
    ]  # fmt: skip
    # the python model carries the export and its sidecar, so it runs what was verified
    assert (repository / "thumbdet" / "1" / "model.onnx").read_bytes() == small_export.onnx_path.read_bytes()
    assert Sidecar.load(repository / "thumbdet" / "1" / "model.onnx").method == "thumbdet"


def standin_engine(folder: Path, onnx_path: Path) -> Path:
    """An engine file with the sidecar build-engine writes: its plan is the real planner's; the engine
    bytes are a stand-in (TensorRT cannot build here)."""
    from tod_deploy.trt.builder import plan_build

    engine = folder / "thumbdet.engine"
    build = plan_build(onnx_path, engine)
    engine.write_bytes(b"stand-in for a serialized engine")
    write_json(sidecar_path(engine), {"engine": {"file": engine.name}, "plan": build.to_dict()})
    return engine


def test_onnxruntime_and_tensorrt_repositories_follow_the_schema(tmp_path: Path, small_onnx: Path) -> None:
    plan = plan_repository(small_onnx, TritonOptions(backend="onnxruntime", device="gpu", accelerator="tensorrt"))
    (config,) = [m.config for m in plan.models]
    assert config.backend == "onnxruntime" and config.max_batch_size == 1  # a batch-1 export
    assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    num_dets = next(o for o in config.output if o.name == "num_dets")
    assert list(num_dets.dims) == [1] and num_dets.HasField("reshape") and list(num_dets.reshape.shape) == []
    assert any("--batch dynamic" in note for note in plan.notes)
    plan = plan_repository(standin_engine(tmp_path, small_onnx), TritonOptions())
    (config,) = [m.config for m in plan.models]
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    text = text_format.MessageToString(config)
    assert text_format.Parse(text, mc.ModelConfig()) == config


def test_bad_package_requests_are_one_line_and_write_nothing(tmp_path: Path, dfr_det_plugin: ExportResult) -> None:
    repo = tmp_path / "repo"
    proc = run("package", str(dfr_det_plugin.onnx_path), "--triton", str(repo), "--backend", "onnxruntime")
    assert_one_line_error(proc, "tod::BinaryConv2d", "--backend python")
    proc = run("package", str(dfr_det_plugin.onnx_path), "--triton", str(repo), "--accelerator", "tensorrt",
               "--backend", "python", "--device", "cpu", "--instances", "0")  # fmt: skip
    assert_one_line_error(proc, "--instances")
    assert not repo.exists() or list(repo.iterdir()) == []
    write_repository(plan_repository(dfr_det_plugin.onnx_path, TritonOptions()), repo)
    proc = run("package", str(dfr_det_plugin.onnx_path), "--triton", str(repo))
    assert_one_line_error(proc, "already has the model", "--overwrite")


def test_python_steps_answer_each_request_on_its_own(dfr_det_plugin: ExportResult) -> None:
    step = DetectorStep.open(dfr_det_plugin.onnx_path, threads=1)
    images = verification_images(dfr_det_plugin.sidecar.recipe, 3, seed=0)
    bad = images[:1].copy()
    bad[0, 0, 5, 5] = np.nan
    answers = step.run([{"images": images[:2]}, {"images": bad}, {"images": images[2:]}])
    assert isinstance(answers[1], RequestError) and "NaN" in str(answers[1])
    alone = OnnxRuntimeRunner(load_onnx(dfr_det_plugin.onnx_path), threads=1).run(images)
    batched = np.concatenate([answers[0]["boxes"], answers[2]["boxes"]])
    np.testing.assert_allclose(batched, alone["boxes"], atol=1e-3)
    assert answers[0]["num_dets"].shape == (2, 1)
    # a fixed-batch file runs a server batch in chunks of its batch, padding the last one
    step.chunk = 2
    chunked = step.run([{"images": images}])[0]
    np.testing.assert_allclose(chunked["boxes"], alone["boxes"], atol=1e-3)

    pre, post = PreprocessStep((256, 256)), PostprocessStep(["a", "b"])
    rng = np.random.default_rng(0)
    png = encode_png(rng.integers(0, 256, (120, 300, 3), dtype=np.uint8))
    (out, broken) = pre.run([{"image": np.array([[png]], object)}, {"image": np.array([[b"\x89PNG broken"]], object)}])
    assert out["images"].shape == (1, 3, 256, 256) and out["letterbox"].shape == (1, 6)
    assert isinstance(broken, RequestError) and "not a readable JPEG or PNG" in str(broken)
    sx, sy = out["letterbox"][0, :2]
    assert 0.84 < sx < 0.86 and 0.84 < sy < 0.86  # 300x120 fits 256 wide: about 256/300
    original = np.array([[0, 0, 300, 120], [150, 60, 300, 120]], np.float32)
    boxes = (original * np.array([sx, sy, sx, sy], np.float32))[None]
    mapped = post.one({"num_dets": np.array([[2]]), "boxes": boxes, "scores": np.ones((1, 2), np.float32),
                       "labels": np.array([[1, 0]], np.int32), "letterbox": out["letterbox"]})  # fmt: skip
    np.testing.assert_allclose(mapped["boxes"][0], original, atol=1e-3)
    assert mapped["class_names"].tolist() == [[b"b", b"a"]]


# ------------------------------------------------------------------ the real server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("which", ["thumbdet", "dfr_det_fcos"])
def test_served_models_match_local_onnxruntime(
    server: TritonServer, protocol: str, which: str, small_export: ExportResult, dfr_det_plugin: ExportResult
) -> None:
    export = small_export if which == "thumbdet" else dfr_det_plugin
    model = load_onnx(export.onnx_path)
    recipe = export.sidecar.recipe
    batch = 1 if which == "thumbdet" else 2
    inputs = [verification_images(recipe, batch, seed) for seed in (0, 1)]
    report = compare(
        OnnxRuntimeRunner(model), ServedRunner(server, protocol, which), inputs, plan_for(model, recipe, []), FP32
    )
    assert report.ok, report.failure()
    assert report.detections is not None and report.detections.checked > 0


@pytest.mark.parametrize(
    ("protocol", "which"), [("http", "dfr_det_fcos"), ("grpc", "dfr_det_fcos"), ("http", "thumbdet")]
)
def test_the_ensemble_takes_image_bytes_and_answers_in_image_pixels(
    server: TritonServer, protocol: str, which: str, small_export: ExportResult, dfr_det_plugin: ExportResult
) -> None:
    export = small_export if which == "thumbdet" else dfr_det_plugin
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)  # any size: the ensemble letterboxes
    client = Client(url(server, protocol), protocol)
    outputs = [*CONTRACT, "class_names"]
    got = client.infer(f"{which}_ensemble", {"image": np.array([[encode_png(rgb)]], object)}, outputs)
    chw, placement = letterbox(rgb, export.sidecar.recipe.input_size)
    local = OnnxRuntimeRunner(load_onnx(export.onnx_path)).run(chw[None])
    ref = {**local, "boxes": placement.to_original(local["boxes"]).astype(np.float32)}
    got["num_dets"] = got["num_dets"].reshape(-1)
    agreement = new_agreement(FP32)
    agree_detections(ref, got, DetectionRule(0.0), agreement, FP32, box_atol=1e-2)
    assert agreement.ok and agreement.checked > 0, agreement
    n = int(got["num_dets"][0])
    assert got["boxes"][0, :n, 2].max() <= 517 and got["boxes"][0, :n, 3].max() <= 333
    assert got["class_names"][0, 0] == f"class_{got['labels'][0, 0]}".encode()


def test_concurrent_clients_are_batched_and_every_answer_is_right(
    server: TritonServer, dfr_det_plugin: ExportResult
) -> None:
    images = verification_images(dfr_det_plugin.sidecar.recipe, 1, seed=5)
    expected = OnnxRuntimeRunner(load_onnx(dfr_det_plugin.onnx_path)).run(images)

    def check(answer: dict[str, np.ndarray]) -> None:
        assert int(answer["num_dets"].reshape(-1)[0]) == int(expected["num_dets"][0])
        np.testing.assert_allclose(answer["boxes"], expected["boxes"], atol=1e-2)
        np.testing.assert_allclose(answer["scores"], expected["scores"], atol=1e-4)
        assert (answer["labels"] == expected["labels"]).all()

    started = time.monotonic()
    report = run_load(url(server, "grpc"), "dfr_det_fcos", [8], protocol="grpc", requests_per_client=25,
                      request={"images": images}, check=check, log=lambda _l: None)  # fmt: skip
    (level,) = report.levels
    assert time.monotonic() - started < 300
    assert len(level.latencies_ms) == 200 and not level.failures and level.wrong == 0
    inferences, executions = level.batching["dfr_det_fcos"]
    assert inferences == 200 and executions < inferences  # the dynamic batcher merged requests
    assert level.mean_batch() > 1.0


def test_bad_requests_get_errors_and_the_server_keeps_serving(server: TritonServer) -> None:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(url(server, "http"))

    def infer(model: str, name: str, value: np.ndarray, datatype: str) -> None:
        tensor = http.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        client.infer(model, [tensor])

    good = np.random.default_rng(0).uniform(0, 255, (1, 3, 256, 256)).astype(np.float32)
    cases = [
        ("dfr_det_fcos", "images", good.astype(np.int32), "INT32", "data-type"),
        ("dfr_det_fcos", "images", good[:, :, :100], "FP32", "shape"),
        ("dfr_det_fcos", "images", np.full_like(good, np.nan), "FP32", "NaN"),
        ("dfr_det_fcos_ensemble", "image", np.array([[b"not an image"]], object), "BYTES", "not a readable JPEG"),
        ("yolo", "images", good, "FP32", "yolo"),
    ]
    for model, name, value, datatype, needle in cases:
        with pytest.raises(InferenceServerException) as caught:
            infer(model, name, value, datatype)
        assert needle.lower() in str(caught.value).lower(), str(caught.value)
        infer("dfr_det_fcos", "images", good, "FP32")  # the next good request is served


def test_bench_triton_reports_each_concurrency(server: TritonServer, tmp_path: Path) -> None:
    proc = run("bench", "--triton", url(server, "http"), "--model", "dfr_det_fcos_ensemble", "--concurrency", "1,2",
               "--requests", "3", "--json", str(tmp_path / "load.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "p99 ms" in proc.stdout and "requests per execution" in proc.stdout
    levels = json.loads((tmp_path / "load.json").read_text())["levels"]
    assert [(lv["concurrency"], lv["requests"], lv["failed"]) for lv in levels] == [(1, 3, 0), (2, 6, 0)]
    assert all(lv["latency_ms"]["p50"] <= lv["latency_ms"]["p99"] for lv in levels)
    steps = {f"dfr_det_fcos{suffix}" for suffix in ("_preprocess", "", "_postprocess")}
    assert set(levels[1]["server"]) == steps  # an ensemble's batching is its steps'
    assert all(counts["inferences"] == 6 for counts in levels[1]["server"].values())
    proc = run("bench", "--triton", url(server, "http"), "--model", "yolo")
    assert_one_line_error(proc, "cannot reach model 'yolo'")


# ------------------------------------------------------------------ starting and stopping


def test_restart_mid_load_fails_requests_visibly_and_serves_again(tmp_path: Path, dfr_det_plugin: ExportResult) -> None:
    repo = tmp_path / "repo"
    write_repository(plan_repository(dfr_det_plugin.onnx_path, TritonOptions()), repo)
    images = verification_images(dfr_det_plugin.sidecar.recipe, 1, seed=7)
    expected = OnnxRuntimeRunner(load_onnx(dfr_det_plugin.onnx_path)).run(images)

    def check(answer: dict[str, np.ndarray]) -> None:
        np.testing.assert_allclose(answer["boxes"], expected["boxes"], atol=1e-2)

    server = TritonServer(repo, Ports.free()).start()
    try:
        result = {}
        load = threading.Thread(target=lambda: result.update(report=run_load(
            url(server, "http"), "dfr_det_fcos", [4], protocol="http", duration_s=12.0, request={"images": images},
            check=check, log=lambda _l: None)))  # fmt: skip
        load.start()
        time.sleep(2.0)
        server.stop()
        assert leftover_processes(repo) == []
        server.start()
        load.join(60)
        assert not load.is_alive()
        (level,) = result["report"].levels
        assert level.wrong == 0
        assert sum(level.failures.values()) > 0  # requests during the restart failed, and were counted
        assert len(level.latencies_ms) > 0
        after = run_load(url(server, "http"), "dfr_det_fcos", [2], requests_per_client=3, request={"images": images},
                         check=check, log=lambda _l: None).levels[0]  # fmt: skip
        assert len(after.latencies_ms) == 6 and not after.failures and after.wrong == 0
    finally:
        server.stop()
    assert leftover_processes(repo) == []


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_a_missing_backend_is_one_line(tmp_path: Path, small_onnx: Path, backend: str) -> None:
    """The bundle has only the python backend: the server's own load error, as one line from serve."""
    repo = tmp_path / "repo"
    model = small_onnx if backend == "onnxruntime" else standin_engine(tmp_path, small_onnx)
    write_repository(plan_repository(model, TritonOptions(backend=backend)), repo)
    proc = run("serve", str(repo), *port_args(Ports.free()), "--timeout", "60")
    assert_one_line_error(proc, f"'{backend}' backend", "backend not found", "--backend python")
    assert leftover_processes(repo) == []


def test_startup_failure_reads_the_servers_own_words() -> None:
    log = (
        "E1201 model_lifecycle.cc:642] \"failed to load 'm' version 1: Invalid argument: unable to find backend "
        "library for backend 'tensorrt', try specifying runtime on the model configuration.\"\n"
    )
    line, fix = startup_failure(log, 1)
    assert "'tensorrt' backend" in line and "backend not found" in line and "container" in fix
    line, _ = startup_failure("\"failed to load 'm' version 1: Internal: ModuleNotFoundError: x\"\n", 1)
    assert line == "model 'm' failed to load: Internal: ModuleNotFoundError: x"


def port_args(ports: Ports) -> list[str]:
    return ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]


def test_serve_prints_endpoints_and_stops_on_ctrl_c(tmp_path: Path, dfr_det_plugin: ExportResult) -> None:
    repo = tmp_path / "repo"
    write_repository(plan_repository(dfr_det_plugin.onnx_path, TritonOptions()), repo)
    ports = Ports.free()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tod_deploy.cli", "serve", str(repo), *port_args(ports)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while "ready" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stdout.readline()
        assert f"http://localhost:{ports.http}" in seen and f"localhost:{ports.grpc}" in seen, seen
        assert Client(f"127.0.0.1:{ports.http}", "http").metadata("dfr_det_fcos")["name"] == "dfr_det_fcos"
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        assert "stopped tritonserver" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert leftover_processes(repo) == []


def test_serving_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a folder"):
        TritonServer(tmp_path / "nope").start()
