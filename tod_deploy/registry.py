"""Method name -> how to build it. The only place that knows which papers exist."""

from __future__ import annotations

from tod_deploy.errors import UserError
from tod_deploy.methods import bh, cfinet, dfr_det, sr_tod, thumbdet
from tod_deploy.methods.base import MethodSpec

METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (thumbdet.SPEC, sr_tod.SPEC, dfr_det.SPEC, cfinet.SPEC, bh.SPEC)
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}", f"choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]
