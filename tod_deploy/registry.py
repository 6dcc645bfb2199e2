"""Method name -> how to build it. The only place that knows which papers exist.

The names are plain strings, so the command line can list them without importing the methods
(and torch); a method's module is imported when it is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tod_deploy.errors import UserError

if TYPE_CHECKING:
    from tod_deploy.methods.base import MethodSpec

METHOD_MODULES: dict[str, str] = {
    "thumbdet": "tod_deploy.methods.thumbdet",
    "sr_tod": "tod_deploy.methods.sr_tod",
    "dfr_det": "tod_deploy.methods.dfr_det",
    "cfinet": "tod_deploy.methods.cfinet",
    "bh": "tod_deploy.methods.bh",
}


def method_names() -> list[str]:
    return list(METHOD_MODULES)


def check_method_name(name: str) -> None:
    """Refuse an unknown method without importing it (and torch with it)."""
    if name not in METHOD_MODULES:
        raise UserError(f"unknown method {name!r}", f"choose one of: {', '.join(sorted(METHOD_MODULES))}")


def get_method(name: str) -> MethodSpec:
    check_method_name(name)
    spec = importlib.import_module(METHOD_MODULES[name]).SPEC
    assert spec.name == name, f"{METHOD_MODULES[name]} defines {spec.name}"
    return spec


def all_methods() -> list[MethodSpec]:
    return [get_method(name) for name in METHOD_MODULES]
