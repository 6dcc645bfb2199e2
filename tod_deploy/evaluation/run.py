"""``eval``: one model on every requested backend over a COCO data set, scored with the same AP code.

Other exports of the same model (``--compare``: its FP16 or INT8 files) join as extra onnxruntime
rows, and ``--fidelity`` scores every row against the FP32 onnxruntime row's detections taken as
ground truth: deployment fidelity, which needs no labels and shows what a precision change costs
on the same weights.

Each image is read once, letterboxed into the model's input (``datasets.letterbox``), and fed
to every backend (``--noise-floor``: the reference's runner also gets it changed by one grey level);
the detection contract (DESIGN.md section 4) comes back, rows past ``num_dets`` are dropped, boxes
are mapped to the original image's pixels and labels to the data set's category ids, and
``coco_eval.evaluate_detections`` scores each backend's detections.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tod_deploy.errors import UserError
from tod_deploy.evaluation.coco_eval import (
    category_lookup,
    crossed_the_cut,
    detections_as_ground_truth,
    evaluate_detections,
)
from tod_deploy.evaluation.datasets import Letterbox, letterbox, load_coco, read_rgb

FIDELITY_MAX_DETS = 1000
NOISE_SEED = 0  # the --noise-floor row's pixel changes: the same images, the same changes, run after run
Log = Callable[[str], None]


@dataclass
class EvalReport:
    model: str
    method: str
    input_size: tuple[int, int]
    data: str
    images_dir: str
    num_images: int
    class_agnostic: bool
    max_dets: int
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Per backend: [{image_id, category_id, bbox, score}], original pixels (not in the JSON: it can be large).
    detections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # The evaluated images' COCO ground truth (images, categories, annotations): what ``score_fidelity``
    # builds its reference on, so that scoring needs neither a second read of the labels nor a second run.
    ground_truth: dict[str, Any] = field(default_factory=dict, repr=False)
    # Per row other than the reference: metrics against the reference row's detections as ground truth.
    fidelity: dict[str, dict[str, Any]] = field(default_factory=dict)
    fidelity_reference: str | None = None
    fidelity_min_score: float | None = None
    # --noise-floor: the reference run on each image changed by at most one grey level (a yardstick, not gated)
    noise_floor_row: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "input_size": list(self.input_size),
            "data": self.data,
            "images_dir": self.images_dir,
            "images": self.num_images,
            "class_agnostic": self.class_agnostic,
            "max_dets": self.max_dets,
            "metrics": "AP averaged over IoU 0.50:0.95; AI-TOD bins on sqrt(area): vt [2,8), t [8,16), "
            "s [16,32), m [32,64) px; coco_AP* use COCO's areas; null = no ground truth in that range",
            "results": self.results,
            "seconds": self.seconds,
            "fidelity": {
                "reference": self.fidelity_reference,
                "min_score": self.fidelity_min_score,
                "noise_floor_row": self.noise_floor_row,
                "results": self.fidelity,
            }
            if self.fidelity_reference
            else None,
        }


@dataclass
class LoadedModel:
    name: str
    method: str
    input_size: tuple[int, int]
    num_classes: int | None
    runners: dict[str, Any]
    class_names: list[str] = field(default_factory=list)


def _static_input_size(model: Any, path: Path) -> tuple[int, int] | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise UserError(f"{path.name} does not take images [N, 3, H, W]", "evaluate a detection-contract export")
    batch = dims[0].dim_value
    if batch > 1:
        raise UserError(f"{path.name} was exported for batch {batch}", "re-export with --batch 1 or --batch dynamic")
    h, w = dims[2].dim_value, dims[3].dim_value
    return (h, w) if h > 0 and w > 0 else None


def load_model(
    model_path: Path | None,
    method: str | None,
    backends: str | None,
    checkpoint: Path | None = None,
    input_size: str | None = None,
    log: Log = print,
    precision: str = "auto",
) -> LoadedModel:
    """Runners for an exported ONNX (torch rebuilt from its sidecar) or for a method's PyTorch model."""
    from tod_deploy.backends import ExportSource, RunnerOptions, open_runner, parse_backends
    from tod_deploy.backends.torch_runner import TorchRunner
    from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS

    if (model_path is None) == (method is None):
        raise UserError("give either a model file or --method", "e.g. tod-deploy eval model.onnx --data ann.json ...")
    runners: dict[str, Any] = {}
    if model_path is not None:
        from tod_deploy.artifacts import Sidecar
        from tod_deploy.backends.onnxruntime_runner import load_onnx

        if checkpoint is not None or input_size is not None:
            raise UserError("--checkpoint and --input-size go with --method", "an export's sidecar already fixes them")
        names = parse_backends(backends, "onnxruntime")
        onnx_model = load_onnx(model_path)
        outputs = {o.name for o in onnx_model.graph.output}
        if not set(CONTRACT_OUTPUTS) <= outputs:
            raise UserError(
                f"{model_path.name} lacks the detection outputs {list(CONTRACT_OUTPUTS)} (a --raw export?)",
                "evaluate an export without --raw",
            )
        sidecar = Sidecar.load(model_path)
        recipe = sidecar.recipe
        size = _static_input_size(onnx_model, model_path) or tuple(recipe.input_size)
        source = ExportSource(model_path, sidecar, _model=onnx_model)
        options = RunnerOptions(precision=precision, log=log)
        runners = {backend: open_runner(backend, source, options) for backend in names}
        name = str(model_path)
    else:
        from tod_deploy.models import build_deploy_model, resolve_recipe

        names = parse_backends(backends, "torch")
        if names != ["torch"]:
            raise UserError(
                f"--method runs the PyTorch model only, not {', '.join(b for b in names if b != 'torch')}",
                "export it first (tod-deploy export) and evaluate the .onnx for other backends",
            )
        recipe = resolve_recipe(method, None, {"input_size": input_size} if input_size else None, checkpoint)
        deploy, _ = build_deploy_model(recipe, checkpoint, 0, log)
        runners["torch"] = TorchRunner(deploy, list(CONTRACT_OUTPUTS))
        size = tuple(recipe.input_size)
        name = f"--method {method}"
    num_classes = recipe.model.get("num_classes")
    return LoadedModel(name, recipe.method, (int(size[0]), int(size[1])), num_classes, runners, list(recipe.classes))


def compare_runners(paths: list[Path], input_size: tuple[int, int], log: Log = print) -> dict[str, Any]:
    """onnxruntime rows for other exports of the model (e.g. FP16 / INT8), named by their precision; files
    of one precision (say INT8 files quantized with different ``--exclude``) add their file name."""
    from tod_deploy.artifacts import Sidecar
    from tod_deploy.backends import ExportSource, RunnerOptions
    from tod_deploy.backends.onnxruntime_runner import load_onnx, open_runner

    if len({path.resolve() for path in paths}) < len(paths):
        raise UserError("a compared file is given twice", "pass each --compare file once")
    sources: list[tuple[str, ExportSource]] = []
    for path in paths:
        onnx_model = load_onnx(path)
        size = _static_input_size(onnx_model, path)
        if size is not None and size != input_size:
            raise UserError(
                f"{path.name} takes {size[0]}x{size[1]} images, the evaluated model {input_size[0]}x{input_size[1]}",
                "compare exports of the same model",
            )
        sidecar = Sidecar.load(path)
        sources.append((precision_label(sidecar, path), ExportSource(path, dict(sidecar), _model=onnx_model)))
    labels = Counter(label for label, _ in sources)
    runners: dict[str, Any] = {}
    for label, source in sources:
        name = f"onnxruntime {label}" + (f" {source.onnx_path.name}" if labels[label] > 1 else "")
        if name in runners:
            raise UserError(f"two compared files are both {source.onnx_path.name!r} of {label!r}",
                            "rename one of them (quantize --output)")  # fmt: skip
        runners[name] = open_runner(source, RunnerOptions(log=log))
    return runners


def precision_label(sidecar: Any, path: Path) -> str:
    """A compared file's precision as its row names it: both INT8 layouts, and 7- and 8-bit weights, apart."""
    from tod_deploy.quant.int8 import sidecar_weight_bits

    quantization = sidecar.get("quantization") or {}
    label = str(quantization.get("precision") or sidecar.get("precision") or path.stem)
    if target := (quantization.get("layout") or {}).get("target"):
        eight_bit = target == "onnxruntime" and sidecar_weight_bits(sidecar) == 8
        label = f"{label} ({target} layout{', 8-bit weights' if eight_bit else ''})"
    return label


def contract_to_detections(
    outputs: dict[str, np.ndarray],
    mapping: Letterbox,
    image_id: int,
    to_category: Callable[[int], int | None],
    where: str = "",
) -> list[dict[str, Any]]:
    """One image's detection contract -> COCO results in original pixels (xywh), labels as category ids."""
    boxes, scores = np.asarray(outputs["boxes"])[0], np.asarray(outputs["scores"])[0]
    labels, count = np.asarray(outputs["labels"])[0], int(np.asarray(outputs["num_dets"]).reshape(-1)[0])
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise UserError(
            f"the model produced NaN/Inf {'boxes' if not np.isfinite(boxes).all() else 'scores'}{where}",
            "check the export with tod-deploy verify (and the checkpoint's weights)",
        )
    count = max(0, min(count, len(scores)))
    xyxy = mapping.to_original(boxes[:count])
    detections = []
    for (x1, y1, x2, y2), score, label in zip(xyxy, scores[:count], labels[:count], strict=True):
        category = to_category(int(label))
        if category is None or x2 <= x1 or y2 <= y1:
            continue  # a label that is no category of the data set, or a box wholly outside the image
        detections.append(
            {"image_id": image_id, "category_id": category, "bbox": [float(x1), float(y1), float(x2 - x1),
             float(y2 - y1)], "score": float(score)}
        )  # fmt: skip
    return detections


def evaluate_model(
    model_path: Path | None,
    data: Path,
    images_dir: Path,
    method: str | None = None,
    backends: str | None = None,
    max_images: int | None = None,
    class_agnostic: bool = False,
    max_dets: int = 100,
    checkpoint: Path | None = None,
    input_size: str | None = None,
    log: Log = print,
    compare: list[Path] | None = None,
    precision: str = "auto",
    noise_floor: bool = False,
) -> EvalReport:
    """Every row's detections on the images and its AP against the labels. Fidelity is a second step on
    the report (``score_fidelity``), so a model with nothing to score it on still has its AP to show.
    ``noise_floor`` adds the reference's runner once more, on each image changed by at most one grey
    level per pixel."""
    coco = load_coco(data, images_dir, max_images)  # check the data before the (slow) model build
    loaded = load_model(model_path, method, backends, checkpoint, input_size, log, precision)
    if compare:
        if model_path is None:
            raise UserError("--compare needs a model file to compare with", "pass the FP32 .onnx as the model")
        loaded.runners |= compare_runners(compare, loaded.input_size, log)
    to_category = category_lookup(loaded.num_classes, coco.categories, class_agnostic, loaded.class_names)
    report = EvalReport(
        loaded.name, loaded.method, loaded.input_size, str(data), str(images_dir), len(coco.images),
        class_agnostic, max_dets,
    )  # fmt: skip
    rows = dict(loaded.runners)
    if noise_floor:
        reference = fidelity_reference(list(rows))
        report.noise_floor_row = f"{reference} on +-1 grey level"
        rows[report.noise_floor_row] = rows[reference]
    noise = np.random.default_rng(NOISE_SEED)
    detections: dict[str, list[dict[str, Any]]] = {b: [] for b in rows}
    seconds = dict.fromkeys(rows, 0.0)
    log(f"evaluating {len(coco.images)} images at {loaded.input_size[0]}x{loaded.input_size[1]} "
        f"on {', '.join(rows)} ...")  # fmt: skip
    step = max(1, len(coco.images) // 4)
    for i, image in enumerate(coco.images):
        path = coco.image_path(image)
        rgb = read_rgb(path)
        pixels, mapping = letterbox(rgb, loaded.input_size)
        batches = {backend: pixels[None] for backend in rows}
        if report.noise_floor_row:
            batches[report.noise_floor_row] = letterbox(one_grey_level(rgb, noise), loaded.input_size)[0][None]
        for backend, runner in rows.items():
            start = time.perf_counter()
            outputs = runner.run(batches[backend])
            seconds[backend] += time.perf_counter() - start
            where = f" on {backend} for {path.name}"
            detections[backend] += contract_to_detections(outputs, mapping, image["id"], to_category, where)
        if (i + 1) % step == 0 or i + 1 == len(coco.images):
            log(f"  {i + 1}/{len(coco.images)} images")
    report.ground_truth = coco.subset()
    for backend, dets in detections.items():
        report.results[backend] = evaluate_detections(report.ground_truth, dets, class_agnostic, max_dets)
    report.seconds = {b: round(s, 3) for b, s in seconds.items()}
    report.detections = detections
    return report


def one_grey_level(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``rgb`` (uint8) with each value moved by -1, 0 or +1 at random, within 0..255.

    The smallest change an image can take, as large as two JPEG decoders' disagreement: what the model
    does with it is a floor to read every other row's fidelity against (``eval --noise-floor``).
    """
    moved = rgb.astype(np.int16) + rng.integers(-1, 2, size=rgb.shape, dtype=np.int16)
    return np.clip(moved, 0, 255).astype(np.uint8)


def fidelity_reference(rows: list[str]) -> str:
    """The row the others are scored against: FP32 onnxruntime when it runs, else the first."""
    return "onnxruntime" if "onnxruntime" in rows else rows[0]


def score_fidelity(report: EvalReport, min_score: float) -> None:
    """Each row against the reference row's confident detections (score >= ``min_score``; the FP32
    onnxruntime row, else the first row), as if they were the labels.

    Every detection a row keeps counts (COCO's maxDets raised to the most any image has, up to
    ``FIDELITY_MAX_DETS``: pycocotools' memory grows with detections x ground truths per image, and
    3000 x 3000 per image, SR-TOD on AI-TOD, took over 10 GB), so a row must reproduce all of them.
    """
    rows = list(report.detections)
    reference = fidelity_reference(rows)
    truth = detections_as_ground_truth(report.ground_truth, report.detections[reference], min_score)
    if not truth["annotations"]:
        raise UserError(
            f"{reference} has no detection scoring {min_score:g} or more to use as ground truth",
            "lower --fidelity-score (random-weight and briefly trained models score low)",
        )
    most = [max(Counter(d["image_id"] for d in dets).values(), default=0) for dets in report.detections.values()]
    max_dets = min(max([report.max_dets, *most]), max(report.max_dets, FIDELITY_MAX_DETS))
    report.fidelity_reference, report.fidelity_min_score = reference, min_score
    reference_dets, reference_boxes = report.detections[reference], len(truth["annotations"])
    for row in rows:
        if row == reference:
            continue
        metrics = evaluate_detections(truth, report.detections[row], report.class_agnostic, max_dets)
        up = crossed_the_cut(reference_dets, report.detections[row], min_score, report.class_agnostic)
        down = crossed_the_cut(report.detections[row], reference_dets, min_score, report.class_agnostic)
        metrics["counts"] |= {"crossed_up": up, "crossed_down": down}
        # per reference box, as "found" (AR50) is
        metrics["crossed_up"], metrics["crossed_down"] = up / reference_boxes, down / reference_boxes
        report.fidelity[row] = metrics
