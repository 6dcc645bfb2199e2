"""TensorRT 11: a built engine, or one built in memory from the export (nothing written).

TensorRT is imported only here and in trt/; its absence is one line before any slow step.
"""

from __future__ import annotations

from typing import Any

from tod_deploy.backends.base import ExportSource, RunnerOptions


def open_runner(source: ExportSource, options: RunnerOptions) -> Any:
    from tod_deploy.trt.runtime import require_tensorrt

    require_tensorrt()
    from tod_deploy.trt.runner import runner_for

    return runner_for(source.engine_path, source.onnx_path, options.batch, options.log, options.cuda_graph)
