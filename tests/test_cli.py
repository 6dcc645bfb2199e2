"""The command line as a user runs it: real subprocesses, exit codes, one-line errors, no debris."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tod_deploy.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, proc.stderr
    for needle in needles:
        assert needle in error_lines[0], proc.stderr


def test_help_lists_the_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("export", "verify", "bench", "inspect", "methods"):
        assert command in proc.stdout


def test_unknown_method(tmp_path: Path) -> None:
    proc = run("export", "--method", "yolo", "--output", str(tmp_path))
    assert_one_line_error(proc, "unknown method 'yolo'", "thumbdet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [("-m", "yolo"), ("-m", "thumbdet", "--input-size", "80ax9"),
                                   ("-m", "thumbdet", "--scale", "3")])  # fmt: skip
def test_flag_errors_come_before_torch_loads(flags: tuple[str, ...], tmp_path: Path) -> None:
    """A mistyped method or flag is refused with exit status 2 before torch is imported (seconds)."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['tod-deploy', 'export', *{list(flags)!r}, '--output', {str(tmp_path)!r}]\n"
        "try:\n    runpy.run_module('tod_deploy.cli', run_name='__main__')\n"
        "except SystemExit as exit:\n    print('status', exit.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["status", "2", "False"], (proc.stdout, proc.stderr)


def test_missing_checkpoint(tmp_path: Path) -> None:
    proc = run("export", "-m", "thumbdet", "--checkpoint", str(tmp_path / "x.pth"), "--output", str(tmp_path / "o"))
    assert_one_line_error(proc, "does not exist", "--checkpoint")
    assert not (tmp_path / "o" / "thumbdet.onnx").exists()


def test_checkpoint_of_another_model(tmp_path: Path) -> None:
    import torch

    torch.save({"model": {"fc.weight": torch.zeros(10, 512)}}, tmp_path / "resnet.pth")
    proc = run("export", "-m", "thumbdet", "--checkpoint", str(tmp_path / "resnet.pth"), "--output", str(tmp_path))
    assert_one_line_error(proc, "lacks", "checkpoint of thumbdet")
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize(("size", "needle"), [("100x100", "minimum of 256"), ("80ax9", "HEIGHTxWIDTH")])
def test_bad_input_size(tmp_path: Path, size: str, needle: str) -> None:
    proc = run("export", "-m", "thumbdet", "--input-size", size, "--output", str(tmp_path))
    assert_one_line_error(proc, needle)
    assert list(tmp_path.iterdir()) == []


def test_bad_scale(tmp_path: Path) -> None:
    assert_one_line_error(run("export", "-m", "thumbdet", "--scale", "3", "--output", str(tmp_path)), "no variant '3x'")


def test_verify_and_bench_reject_corrupt_or_non_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    assert_one_line_error(run("verify", str(bad)), "not a valid ONNX model")
    assert_one_line_error(run("bench", "--fps", str(bad)), "not a valid ONNX model")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(run("verify", str(text)), "not a valid ONNX model")
    assert_one_line_error(run("bench", str(tmp_path / "missing.onnx")), "does not exist")


def test_onnx_without_sidecar(tmp_path: Path, small_onnx: Path) -> None:
    lone = tmp_path / "lone.onnx"
    shutil.copy(small_onnx, lone)
    assert_one_line_error(run("verify", str(lone)), "sidecar", "re-export")


@pytest.mark.parametrize("flag", [("--iters", "0"), ("--iters", "-3"), ("--warmup", "-1"), ("--batch", "0")])
def test_bench_rejects_non_positive_counts(small_onnx: Path, flag: tuple[str, str]) -> None:
    proc = run("bench", str(small_onnx), *flag)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert flag[0] in proc.stderr


def test_bench_batch_mismatch(small_onnx: Path) -> None:
    assert_one_line_error(run("bench", str(small_onnx), "--batch", "4"), "exported for batch 1", "--batch dynamic")


def test_missing_tensorrt_is_one_line(small_onnx: Path) -> None:
    pytest.importorskip("numpy")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert_one_line_error(run("bench", str(small_onnx), "--backend", "tensorrt"), "TensorRT is not installed")


def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = run("--debug", "export", "--method", "yolo", "--output", str(tmp_path))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_verify_and_bench_json(small_onnx: Path, tmp_path: Path) -> None:
    proc = run("verify", str(small_onnx), "--json", str(tmp_path / "v.json"))
    assert proc.returncode == 0, proc.stderr
    assert "pred_logits" in proc.stdout
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is True
    proc = run("bench", "--fps", str(small_onnx), "--iters", "2", "--warmup", "1", "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report["results"]) == {"torch", "onnxruntime"}
    for stats in report["results"].values():
        assert stats["iters"] == 2 and stats["fps"] > 0 and stats["p99_ms"] >= stats["median_ms"] > 0
    assert report["fps_ratio_vs_torch"]["torch"] == 1.0
    assert "onnxruntime" in proc.stdout and "FPS" in proc.stdout


def test_inspect_json(tmp_path: Path) -> None:
    proc = run("inspect", "--method", "thumbdet", "--input-size", "800x1066", "--json", str(tmp_path / "i.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "i.json").read_text())
    assert result["paper"]["gmacs"] == 13.36
    assert abs(result["gmacs"] / 13.36 - 1) < 0.10


def test_sr_tod_bad_detector_and_preset(tmp_path: Path) -> None:
    proc = run("export", "-m", "sr_tod", "--detector", "yolo", "--output", str(tmp_path))
    assert_one_line_error(proc, "unknown detector 'yolo'", "faster_rcnn, cascade_rcnn, retinanet")
    proc = run("export", "-m", "sr_tod", "--preset", "coco", "--output", str(tmp_path))
    assert_one_line_error(proc, "no variant 'coco'", "aitod")
    proc = run("export", "-m", "thumbdet", "--extra-outputs", "diff_map", "--input-size", "256x256", "--output",
               str(tmp_path))  # fmt: skip
    assert_one_line_error(proc, "no extra output 'diff_map'")
    proc = run("export", "-m", "sr_tod", "--input-size", "800x810", "--output", str(tmp_path))
    assert_one_line_error(proc, "not divisible by 32", "800x832")
    assert list(tmp_path.iterdir()) == []


def test_sr_tod_export_and_visualize(tmp_path: Path) -> None:
    from PIL import Image

    proc = run(
        "export", "-m", "sr_tod", "--detector", "retinanet", "--input-size", "256x256", "--top-k", "50",
        "--extra-outputs", "diff_map", "--output", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    onnx_path = tmp_path / "sr_tod_retinanet.onnx"
    assert onnx_path.is_file() and (tmp_path / "sr_tod_retinanet.json").is_file()
    Image.new("RGB", (320, 240), (120, 60, 30)).save(tmp_path / "photo.png")
    proc = run("visualize", str(onnx_path), "--image", str(tmp_path / "photo.png"), "--out", str(tmp_path / "viz"))
    assert proc.returncode == 0, proc.stderr
    for name in ("photo_diff_map.png", "photo_binary_mask.png"):
        with Image.open(tmp_path / "viz" / name) as img:
            assert img.size == (256, 256) and img.mode == "L"
    assert_one_line_error(run("visualize", str(onnx_path), "--image", str(tmp_path / "nope.png")), "does not exist")
