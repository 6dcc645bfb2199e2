"""What Triton's Python backend runs for a repository written by ``package --triton``.

Each python model's ``model.py`` imports ``TritonPythonModel`` from here; its config parameter
``tod_deploy_role`` picks the step: ``detector`` (the export in tod-deploy's onnxruntime session,
tod::BinaryConv2d included), ``preprocess`` (encoded image bytes -> letterboxed model input) or
``postprocess`` (boxes back to the original image's pixels, class names). The steps are plain
NumPy in, NumPy out, so they are tested without a server; only ``TritonPythonModel`` touches
``triton_python_backend_utils``, which exists inside Triton alone.

Triton hands ``execute`` several requests at once (dynamic batching). Each request is answered on
its own: one with corrupt bytes or non-finite pixels gets an error response naming the problem,
and the others in the same batch are still answered.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Tensors = dict[str, np.ndarray]


class RequestError(ValueError):
    """A request this step cannot answer; its message goes back to that client."""


@dataclass
class DetectorStep:
    """The export in onnxruntime: a server batch is concatenated and run in chunks the file accepts."""

    session: Any
    input_name: str
    output_names: list[str]
    chunk: int | None  # the ONNX's fixed batch, or None when it is symbolic

    @classmethod
    def open(cls, onnx_path: Path, threads: int) -> DetectorStep:
        from tod_deploy.backends.onnxruntime_runner import new_session

        session = new_session(onnx_path, threads or None)
        first = session.get_inputs()[0]
        batch = first.shape[0]
        return cls(
            session, first.name, [o.name for o in session.get_outputs()], batch if isinstance(batch, int) else None
        )

    @property
    def inputs(self) -> list[str]:
        return [self.input_name]

    def run(self, requests: list[Tensors]) -> list[Tensors | RequestError]:
        answers: list[Tensors | RequestError] = []
        good: list[np.ndarray] = []
        for request in requests:
            images = request[self.input_name]
            if not np.isfinite(images).all():
                answers.append(RequestError(f"{self.input_name} holds NaN or Inf values; send finite pixels 0..255"))
            else:
                answers.append({})
                good.append(np.ascontiguousarray(images, dtype=np.float32))
        if not good:
            return answers
        outputs = self._run_batch(np.concatenate(good))
        start = 0
        for i, answer in enumerate(answers):
            if isinstance(answer, RequestError):
                continue
            count = len(requests[i][self.input_name])
            answers[i] = {name: _per_item(value[start : start + count]) for name, value in outputs.items()}
            start += count
        return answers

    def _run_batch(self, images: np.ndarray) -> Tensors:
        size = self.chunk or len(images)
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            real = len(chunk)
            if real < size:  # a fixed-batch file: pad the last chunk, drop the padding's answers
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
            parts.append([o[:real] for o in self.session.run(None, {self.input_name: chunk})])
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(self.output_names)}


def _per_item(value: np.ndarray) -> np.ndarray:
    """A per-image scalar ([N], e.g. num_dets) is declared [1] per item: answer [N, 1]."""
    return value.reshape(len(value), 1) if value.ndim == 1 else value


@dataclass
class PreprocessStep:
    """Encoded JPEG/PNG bytes of any size -> float32 [3, H, W] letterboxed, and how to map back."""

    input_hw: tuple[int, int]

    inputs = ["image"]

    def run(self, requests: list[Tensors]) -> list[Tensors | RequestError]:
        answers: list[Tensors | RequestError] = []
        for request in requests:
            try:
                pairs = [self.one(_as_bytes(item)) for item in request["image"].reshape(-1)]
            except RequestError as exc:
                answers.append(exc)
                continue
            answers.append({"images": np.stack([p[0] for p in pairs]), "letterbox": np.stack([p[1] for p in pairs])})
        return answers

    def one(self, encoded: bytes) -> tuple[np.ndarray, np.ndarray]:
        from tod_deploy.errors import UserError
        from tod_deploy.evaluation.datasets import decode_rgb, letterbox

        try:
            rgb = decode_rgb(io.BytesIO(encoded), f"of {len(encoded)} bytes")
        except UserError as exc:
            raise RequestError(f"image: {len(encoded)} bytes that are not a readable JPEG or PNG image") from exc
        chw, placement = letterbox(rgb, self.input_hw)
        return chw, placement.to_array()


@dataclass
class PostprocessStep:
    """Detections in model-input pixels -> the original image's pixels, with class names."""

    class_names: list[str]

    inputs = ["num_dets", "boxes", "scores", "labels", "letterbox"]

    def run(self, requests: list[Tensors]) -> list[Tensors | RequestError]:
        return [self.one(request) for request in requests]

    def one(self, request: Tensors) -> Tensors:
        from tod_deploy.evaluation.datasets import Letterbox

        boxes = np.empty_like(request["boxes"])
        names = np.empty(request["labels"].shape, dtype=object)
        for i, placement in enumerate(request["letterbox"]):
            boxes[i] = Letterbox.from_array(placement).to_original(request["boxes"][i]).astype(np.float32)
            labels = request["labels"][i]
            names[i] = [self.class_names[k].encode() if 0 <= k < len(self.class_names) else b"" for k in labels]
        return {
            "num_dets": request["num_dets"],
            "boxes": boxes,
            "scores": request["scores"],
            "labels": request["labels"],
            "class_names": names,
        }


def _as_bytes(item: Any) -> bytes:
    return item if isinstance(item, bytes) else bytes(item)


def open_step(role: str, version_dir: Path, parameters: dict[str, str]) -> Any:
    """The step a python model's ``tod_deploy_role`` names, opened from its version directory."""
    if role == "detector":
        return DetectorStep.open(version_dir / parameters["onnx"], int(parameters.get("threads", "0")))
    if role == "preprocess":
        return PreprocessStep((int(parameters["input_height"]), int(parameters["input_width"])))
    if role == "postprocess":
        return PostprocessStep((version_dir / "classes.txt").read_text().splitlines())
    raise ValueError(f"unknown tod_deploy_role {role!r} in config.pbtxt; re-package with tod-deploy package --triton")


class TritonPythonModel:
    """Triton's Python-backend interface (``initialize`` / ``execute``) over one step."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.step = open_step(parameters.get("tod_deploy_role", ""), version_dir, parameters)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        tensors = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.step.inputs}
            for request in requests
        ]
        responses = []
        for answer in self.step.run(tensors):
            if isinstance(answer, RequestError):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(answer))))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in answer.items()]))
        return responses
