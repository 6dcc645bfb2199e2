"""What the numbers were measured on: CPU, threads and library versions, for reports."""

from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = ("tod-deploy", "torch", "torchvision", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxscript", "numpy")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, object]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
    }


def tod_deploy_version() -> str:
    return package_versions(("tod-deploy",)).get("tod-deploy", "0+unknown")
