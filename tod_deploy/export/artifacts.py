"""Atomic artifacts: a model file and its JSON sidecar appear together, finished, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged(*targets: Path) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``targets``; rename them over the targets only on success.

    Why: an interrupted or failed export must not leave a ``.onnx`` that looks finished.
    """
    temps = []
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        os.close(fd)
        temps.append(Path(tmp))
    try:
        yield temps
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")
