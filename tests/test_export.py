"""Export end to end on a small ThumbDet: valid ONNX, parity, no teacher, atomic files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tod_deploy.errors import UserError
from tod_deploy.export.passes import expose_tensors
from tod_deploy.export.pipeline import ExportResult, export_model
from tod_deploy.models import build_training_model, parameter_count
from tod_deploy.parity.policy import FP32
from tod_deploy.recipes import load_recipe


def test_export_writes_checked_onnx_that_onnxruntime_runs(small_export: ExportResult) -> None:
    model = onnx.load(str(small_export.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["num_dets", "boxes", "scores", "labels"]
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops and "TopK" in ops  # deformable attention as standard ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    sess = ort.InferenceSession(str(small_export.onnx_path), providers=["CPUExecutionProvider"])
    num_dets, boxes, scores, labels = sess.run(None, {"images": np.zeros((1, 3, 256, 384), np.float32)})
    assert num_dets.dtype == np.int32 and labels.dtype == np.int32
    assert boxes.shape == (1, 100, 4) and scores.shape == (1, 100)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["method"] == "thumbdet" and json.loads(meta["recipe"])["input_size"] == [256, 384]


def test_export_parity_within_tolerances(small_export: ExportResult) -> None:
    report = small_export.verification
    assert report is not None and report.ok
    for output in report.outputs:
        assert output.name in ("pred_logits", "pred_boxes")
        assert output.max_abs < 1e-4 and output.failing == 0
    assert report.detections.checked > 0 and report.detections.matched == report.detections.checked
    assert report.detections.min_iou > 0.99 and report.detections.max_score_diff < 1e-3


def test_sidecar_records_what_a_user_needs(small_export: ExportResult) -> None:
    sidecar = json.loads(small_export.sidecar_path.read_text())
    assert sidecar["method"] == "thumbdet" and sidecar["weights"]["source"] == "seeded"
    assert sidecar["io"]["inputs"][0] == {"name": "images", "dtype": "float32", "shape": [1, 3, 256, 384]}
    assert sidecar["verification"]["ok"] is True
    assert sidecar["onnx"]["sha256"] and sidecar["environment"]["versions"]["onnxruntime"]
    assert not any("teacher" in name for name in sidecar["model"]["submodules"])


def test_exported_graph_holds_the_student_only(small_export: ExportResult) -> None:
    model = onnx.load(str(small_export.onnx_path))
    recipe = load_recipe("thumbdet", overrides={"input_size": "256x384"})
    training, _ = build_training_model(recipe, None, log=lambda _l: None)
    student = parameter_count(training.student)
    assert not any("teacher" in init.name for init in model.graph.initializer)
    weights = sum(
        numpy_helper.to_array(init).size for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT
    )
    deployed = json.loads(small_export.sidecar_path.read_text())["model"]["parameters"]
    # Constant folding moves a little in either direction (position embeddings become constants;
    # the first decoder self-attention, which sees only learned queries, folds to one tensor),
    # but a teacher would add another 40 M.
    assert 0.98 * deployed < weights < 1.02 * deployed
    assert student < deployed < 1.01 * student


def test_raw_outputs_stay_addressable(small_export: ExportResult) -> None:
    model = onnx.load(str(small_export.onnx_path))
    exposed = expose_tensors(model, ["pred_logits", "pred_boxes"])
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(
        zip(
            [o.name for o in sess.get_outputs()],
            sess.run(None, {"images": np.zeros((1, 3, 256, 384), np.float32)}),
            strict=True,
        )
    )
    assert outs["pred_logits"].shape == (1, 300, 91) and outs["pred_boxes"].shape == (1, 300, 4)
    assert ((outs["pred_boxes"] >= 0) & (outs["pred_boxes"] <= 1)).all()


@pytest.mark.slow
def test_raw_and_dynamic_batch_export(tmp_path: Path) -> None:
    result = export_model(
        "thumbdet", tmp_path, overrides={"input_size": "256x256", "batch": "dynamic"}, raw=True, log=lambda _l: None
    )
    model = onnx.load(str(result.onnx_path))
    assert [o.name for o in model.graph.output] == ["pred_logits", "pred_boxes"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert result.verification.ok and result.verification.inputs == 6  # 3 seeds x batch 2
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        logits, _ = sess.run(None, {"images": np.zeros((n, 3, 256, 256), np.float32)})
        assert logits.shape == (n, 300, 91)


def test_failed_verification_leaves_no_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tod_deploy.export.pipeline as pipeline

    real = pipeline.verify_onnx

    def strict_verify(*args: object, **kwargs: object) -> object:
        strict = replace(FP32, atol=0.0, rtol=0.0, scale_rtol=0.0)  # no export is bit-exact
        return real(*args, **{**kwargs, "policy": strict, "seeds": (0,)})  # one input fails it

    monkeypatch.setattr(pipeline, "verify_onnx", strict_verify)
    with pytest.raises(UserError, match=r"verification failed, nothing written: output pred_\w+: \d+ of \d+ elements"):
        export_model("thumbdet", tmp_path, overrides={"input_size": "256x256"}, log=lambda _l: None)
    assert list(tmp_path.iterdir()) == []
