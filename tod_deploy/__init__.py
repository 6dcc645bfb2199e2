"""tod-deploy: export tiny-object detectors to ONNX with proof of parity, benchmark them.

The steps are plain functions, importable without the CLI::

    from tod_deploy import export_model, reverify, bench_model
"""

from __future__ import annotations

from typing import Any

__all__ = ["bench_model", "export_model", "reverify"]


def __getattr__(name: str) -> Any:
    # Lazy: `import tod_deploy` stays cheap (no torch import) until a step is used.
    if name in ("export_model", "reverify"):
        from tod_deploy.export import pipeline

        return getattr(pipeline, name)
    if name == "bench_model":
        from tod_deploy.bench.run import bench_model

        return bench_model
    raise AttributeError(name)
