"""TensorRT optimization profiles: the min / opt / max shape of every network input.

An engine only runs shapes inside its profile, so the profile is checked here, against the ONNX
inputs, before TensorRT spends minutes building: every mistake names the input and the dimension.
Defaults come from the export (its sidecar recipe fixes H and W; only the batch may be dynamic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx

from tod_deploy.errors import UserError

Shape = tuple[int, ...]
Dim = int | str  # a static extent, or the name of a dynamic one
BOUNDS = ("min", "opt", "max")
# Dynamic batch: latency is what papers report (opt 1); 8 images bound the workspace on small GPUs.
DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class InputSpec:
    """One network input as the ONNX file declares it."""

    name: str
    dtype: str
    dims: tuple[Dim, ...]

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.dims)


@dataclass(frozen=True)
class Profile:
    """min <= opt <= max, elementwise, for one input."""

    input: str
    min: Shape
    opt: Shape
    max: Shape

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def onnx_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers (older exporters list weights as inputs too)."""
    weights = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def parse_shape(text: str, flag: str) -> Shape:
    """``1x3x512x512`` -> (1, 3, 512, 512); positive integers only."""
    parts = text.strip().lower().split("x")
    if not all(p.strip().isdigit() for p in parts):
        raise UserError(f"cannot read {flag} shape {text!r}", f"write it as dims joined by x, e.g. {flag} 1x3x800x800")
    shape = tuple(int(p) for p in parts)
    if any(d <= 0 for d in shape):
        raise UserError(f"{flag} shape {text!r} has a dimension <= 0", "every dimension must be a positive integer")
    return shape


def parse_bound(text: str | None, flag: str, inputs: list[InputSpec]) -> dict[str, Shape]:
    """``1x3x512x512`` (the only input) or ``images:1x3x512x512,other:1x4`` -> {input: shape}."""
    if not text:
        return {}
    names = [spec.name for spec in inputs]
    shapes: dict[str, Shape] = {}
    for item in (part for part in text.split(",") if part.strip()):
        name, sep, dims = item.rpartition(":")
        if not sep:
            if len(inputs) != 1:
                raise UserError(
                    f"{flag} {text!r} does not say which input it is for ({len(inputs)} inputs: {', '.join(names)})",
                    f"write {flag} NAME:DIMS, e.g. {flag} {names[0]}:{'x'.join(['1'] * len(inputs[0].dims))}",
                )
            name = names[0]
        if name not in names:
            raise UserError(f"{flag} names input {name!r}, which the model lacks", f"inputs: {', '.join(names)}")
        shapes[name] = parse_shape(dims, flag)
    return shapes


def default_bounds(spec: InputSpec, input_size: tuple[int, int] | None) -> dict[str, Shape] | None:
    """min/opt/max from the ONNX dims and the recipe's input size; None when a dim has no default.

    A dynamic batch (dim 0) gets 1 / 1 / DEFAULT_MAX_BATCH; dynamic spatial dims of an NCHW image
    input get the recipe's H and W; anything else needs explicit flags.
    """
    lows, highs = [], []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int) and dim > 0:
            lows.append(dim)
            highs.append(dim)
        elif axis == 0:
            lows.append(1)
            highs.append(DEFAULT_MAX_BATCH)
        elif input_size is not None and len(spec.dims) == 4 and axis in (2, 3):
            lows.append(input_size[axis - 2])
            highs.append(input_size[axis - 2])
        else:
            return None
    return {"min": tuple(lows), "opt": tuple(lows), "max": tuple(highs)}


def check_profile(spec: InputSpec, profile: Profile) -> None:
    """Rank, static dims and min <= opt <= max, each failure naming the input and the axis."""
    for bound in BOUNDS:
        shape = getattr(profile, bound)
        if len(shape) != len(spec.dims):
            raise UserError(
                f"--{bound} for input {spec.name!r} has {len(shape)} dims {_fmt(shape)}, "
                f"but the model's input has {len(spec.dims)} {_fmt(spec.dims)}",
                f"give {len(spec.dims)} dims joined by x",
            )
        for axis, (got, want) in enumerate(zip(shape, spec.dims, strict=True)):
            if isinstance(want, int) and want > 0 and got != want:
                raise UserError(
                    f"--{bound} for input {spec.name!r} sets dim {axis} to {got}, but the model fixes it at {want}",
                    f"use {want} there (re-export with --batch dynamic to vary the batch)",
                )
    for axis, (lo, mid, hi) in enumerate(zip(profile.min, profile.opt, profile.max, strict=True)):
        if not lo <= mid <= hi:
            raise UserError(
                f"profile for input {spec.name!r} has min {lo}, opt {mid}, max {hi} at dim {axis}",
                "each dim needs min <= opt <= max",
            )


def resolve_profiles(
    inputs: list[InputSpec],
    min_text: str | None = None,
    opt_text: str | None = None,
    max_text: str | None = None,
    input_size: tuple[int, int] | None = None,
) -> list[Profile]:
    """One validated profile per input from the flags given, the rest filled around them.

    opt defaults to --min, else to the export's default; a missing min or max is the export's
    default widened to include opt, so ``--opt 4x3x800x800`` alone means min 1, opt 4, max 8.
    """
    texts = dict(zip(BOUNDS, (min_text, opt_text, max_text), strict=True))
    given = {bound: parse_bound(text, f"--{bound}", inputs) for bound, text in texts.items()}
    profiles = []
    for spec in inputs:
        defaults = default_bounds(spec, input_size) or {}
        lo, mid, hi = (given[bound].get(spec.name) for bound in BOUNDS)
        mid = mid or lo or defaults.get("opt")
        if mid is not None:
            lo = lo or _widen(defaults.get("min"), mid, min)
            hi = hi or _widen(defaults.get("max"), mid, max)
        if lo is None or mid is None or hi is None:
            example = "x".join(str(d) if isinstance(d, int) and d > 0 else "1" for d in spec.dims)
            raise UserError(
                f"input {spec.name!r} has dynamic dims {_fmt(spec.dims)} with no default from the export",
                f"give --min, --opt and --max for it, e.g. --min {spec.name}:{example}",
            )
        profile = Profile(spec.name, lo, mid, hi)
        check_profile(spec, profile)
        profiles.append(profile)
    return profiles


def _widen(default: Shape | None, opt: Shape, pick: Callable[[int, int], int]) -> Shape | None:
    """The default bound moved to include ``opt`` (a rank mismatch is left to check_profile)."""
    if default is None or len(default) != len(opt):
        return default
    return tuple(pick(d, o) for d, o in zip(default, opt, strict=True))


def _fmt(dims: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"
