"""What the numbers were measured on: CPU, threads and library versions, for reports."""

from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = ("tod-deploy", "torch", "torchvision", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxscript", "numpy")


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, None if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {name: installed_version(name) for name in names}
    return {name: version for name, version in versions.items() if version is not None}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("vendor_id", "model name", "flags", ...)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them on x86 ("avx2", "avx512_vnni", ...); empty elsewhere."""
    try:
        with open(cpuinfo) as fh:
            return frozenset(parse_cpuinfo(fh.read()).get("flags", "").split())
    except OSError:
        return frozenset()


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
