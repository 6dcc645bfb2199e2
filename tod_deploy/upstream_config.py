"""Test-time settings read from the training config that an mmdet checkpoint carries, without running it.

mmcv 1.x / mmdet 2 checkpoints keep ``meta['config']`` and mmengine / mmdet 3 checkpoints keep ``meta['cfg']``:
the merged config as Python source (``Config.pretty_text``: yapf-formatted ``name = dict(...)`` lines). An
export has to use the score threshold, NMS, proposal counts, test size and anchors the model was evaluated
with, and those live only in that text. The text comes out of a checkpoint file, so it is untrusted: it is
parsed with :func:`ast.parse` and only plain data is evaluated here (literals, list/tuple/dict displays,
``dict(...)``, names bound earlier, arithmetic on numbers). Nothing in it is executed; every other
statement is skipped and recorded, so the caller can say what it left out.

Shapes of :func:`test_settings` (each key only when the config has it): ``score_threshold``, ``nms_iou``,
``min_score``, ``nms_sigma`` float; ``nms_type``, ``nms_method`` str; ``max_per_img``, ``nms_pre``,
``rpn_max_per_img``, ``rpn_nms_pre``, ``num_classes`` int; ``rpn_iou`` float; ``test_size`` (H, W) or, for
a multi-scale test, ``test_sizes`` [(H, W), ...]; ``keep_ratio`` bool; ``anchor_scales``, ``anchor_ratios``,
``anchor_strides`` lists of numbers; ``classes`` list of str.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tod_deploy.errors import UserError

_SNIPPET_CHARS = 60
_MAX_INT_BITS = 64  # config numbers are counts and sizes; bigger results only come from crafted text
_CONSTANT_TYPES = (int, float, str, bool, type(None))
_ARITHMETIC: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_OWN_SCOPE = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_CAPTURES = (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)


class ConfigTextError(UserError, ValueError):
    """The checkpoint's config text is not Python source at all (damaged, or not a config)."""

    def __init__(self, problem: str, *, lineno: int | None) -> None:
        self.lineno = lineno
        where = f" at line {lineno}" if lineno is not None else ""
        super().__init__(
            f"the training config stored in the checkpoint cannot be read{where}: {problem}",
            "it is not a config as mmcv/mmengine write it; give the test settings yourself (--input-size, --top-k)",
        )


@dataclass(frozen=True)
class SkippedStatement:
    """A top-level statement that is not plain data: left unevaluated (never executed) and reported."""

    line: int
    names: tuple[str, ...]  # the names it would bind; empty for e.g. a bare call
    reason: str


class ParsedConfig(dict[str, Any]):
    """The config's plain-data assignments by name, plus the statements skipped, for the caller to report."""

    def __init__(self, values: dict[str, Any], skipped: list[SkippedStatement]) -> None:
        super().__init__(values)
        self.skipped = tuple(skipped)

    @property
    def skipped_names(self) -> list[str]:
        """Names the text binds whose value was not read, in order of appearance."""
        return list(dict.fromkeys(name for statement in self.skipped for name in statement.names))


class _NotPlainData(Exception):
    """An expression outside the safe subset: its statement is skipped, with this message as the reason."""


class _Skipped:
    """Placeholder for a name bound by a skipped statement, so later references to it are skipped too."""


_SKIPPED = _Skipped()


def parse_config_text(text: str) -> ParsedConfig:
    """Read the plain-data assignments of an mmcv/mmengine ``pretty_text`` without executing any of it.

    Statements are read in order, as Python would run them: a later assignment replaces an earlier one,
    and a skipped statement makes the names it binds unknown (they are left out, and so is anything that
    refers to them). Raises :class:`ConfigTextError`, with the line, for text that is not Python syntax.
    """
    namespace: dict[str, Any] = {}
    skipped: list[SkippedStatement] = []
    for statement in _parse(text).body:
        names = _bound_names(statement)
        try:
            value = _plain_assignment(statement, namespace)
        except _NotPlainData as why:
            reason = str(why)
        except RecursionError:
            reason = "nested too deeply to read"
        else:
            namespace.update(dict.fromkeys(names, value))
            continue
        namespace.update(dict.fromkeys(names, _SKIPPED))
        skipped.append(SkippedStatement(statement.lineno, names, reason))
    return ParsedConfig({name: value for name, value in namespace.items() if value is not _SKIPPED}, skipped)


def _parse(text: str) -> ast.Module:
    """``ast.parse``, with every way it can refuse the text turned into one error, naming the line where known."""
    if not isinstance(text, str):
        raise ConfigTextError(f"expected text, got {type(text).__name__}", lineno=None)
    if "\0" in text:  # Python versions differ on how they refuse these, and none gives the line
        raise ConfigTextError("it contains a NUL byte", lineno=text.count("\n", 0, text.index("\0")) + 1)
    try:
        return ast.parse(text)
    except SyntaxError as error:
        raise ConfigTextError(error.msg, lineno=error.lineno) from None
    except (RecursionError, MemoryError):  # how CPython's parser refuses absurdly deep expressions
        raise ConfigTextError("it is nested too deeply to parse", lineno=None) from None


def _bound_names(statement: ast.stmt) -> tuple[str, ...]:
    """Names a top-level statement would (re)bind or delete if it ran, so a skipped one makes them unknown.

    Walks without recursion (the tree comes from untrusted text) and does not enter lambdas,
    comprehensions or definition bodies, whose names are their own.
    """
    names: list[str] = []
    pending: list[ast.AST] = [statement]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.append(node.id)
        elif isinstance(node, ast.alias):
            names.append((node.asname or node.name).partition(".")[0])
        elif isinstance(node, _CAPTURES) and node.name:
            names.append(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.append(node.rest)
        elif isinstance(node, _DEFINITIONS):
            names.append(node.name)
            continue
        if not isinstance(node, _OWN_SCOPE):
            pending.extend(reversed(list(ast.iter_child_nodes(node))))
    return tuple(dict.fromkeys(names))


def _plain_assignment(statement: ast.stmt, namespace: dict[str, Any]) -> Any:
    """The value of ``name = <plain data>`` (also ``a = b = ...``); anything else is not read."""
    if not isinstance(statement, ast.Assign):
        raise _NotPlainData(f"not a plain assignment: `{_snippet(statement)}`")
    for target in statement.targets:
        if not isinstance(target, ast.Name):
            raise _NotPlainData(f"assigns to `{_snippet(target)}`, not to a plain name")
    return _evaluate(statement.value, namespace)


def _evaluate(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """The value of an expression built only from the safe subset; raises :class:`_NotPlainData` otherwise."""
    read = _READERS.get(type(node))
    if read is None:
        raise _NotPlainData(f"`{_snippet(node)}` is not plain data ({type(node).__name__})")
    return read(node, namespace)


def _constant(node: ast.Constant, _namespace: dict[str, Any]) -> Any:
    if type(node.value) not in _CONSTANT_TYPES:
        raise _NotPlainData(f"`{_snippet(node)}` is not a number, string, bool or None")
    return node.value


def _name(node: ast.Name, namespace: dict[str, Any]) -> Any:
    if node.id not in namespace:
        raise _NotPlainData(f"`{node.id}` is not a value assigned earlier in the config")
    value = namespace[node.id]
    if value is _SKIPPED:
        raise _NotPlainData(f"`{node.id}` was skipped")
    return value


def _list(node: ast.List, namespace: dict[str, Any]) -> list[Any]:
    return [_evaluate(element, namespace) for element in node.elts]


def _tuple(node: ast.Tuple, namespace: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(_evaluate(element, namespace) for element in node.elts)


def _dict_display(node: ast.Dict, namespace: dict[str, Any]) -> dict[Any, Any]:
    """``{key: value, **other}`` (mmcv writes dicts with non-identifier keys, and dicts in tuples, this way)."""
    result: dict[Any, Any] = {}
    for key_node, value_node in zip(node.keys, node.values, strict=True):
        value = _evaluate(value_node, namespace)
        if key_node is None:
            result.update(_mapping(value, value_node))
            continue
        try:
            result[_evaluate(key_node, namespace)] = value
        except TypeError:  # an unhashable key: Python would raise here too
            raise _NotPlainData(f"`{_snippet(key_node)}` cannot be a dict key") from None
    return result


def _dict_call(node: ast.Call, namespace: dict[str, Any]) -> dict[Any, Any]:
    """``dict(key=value, **other)`` or mmengine's ``dict({...})``: the only call that is read, never made."""
    if not (isinstance(node.func, ast.Name) and node.func.id == "dict"):
        raise _NotPlainData(f"calls `{_snippet(node.func)}`; only dict(...) is read")
    if "dict" in namespace:
        raise _NotPlainData("`dict` is rebound by the config, so dict(...) is not the builtin")
    if len(node.args) > 1:
        raise _NotPlainData(f"`{_snippet(node)}` passes more than one mapping to dict()")
    result = {key: value for arg in node.args for key, value in _mapping(_evaluate(arg, namespace), arg).items()}
    keywords: set[str] = set()
    for key, value in _keyword_items(node.keywords, namespace):
        if key in keywords:  # Python raises TypeError here: the call has no value
            raise _NotPlainData(f"dict() gets keyword {key!r} twice")
        keywords.add(key)
        result[key] = value
    return result


def _keyword_items(keywords: list[ast.keyword], namespace: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The (name, value) pairs of ``key=value`` and ``**mapping`` arguments, in call order."""
    for keyword in keywords:
        value = _evaluate(keyword.value, namespace)
        if keyword.arg is not None:
            yield keyword.arg, value
            continue
        mapping = _mapping(value, keyword.value)
        if not all(isinstance(key, str) for key in mapping):
            raise _NotPlainData(f"`**{_snippet(keyword.value)}` has keys that are not strings")
        yield from mapping.items()


def _mapping(value: Any, node: ast.expr) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise _NotPlainData(f"`{_snippet(node)}` is not a dict")
    return value


def _negative(node: ast.UnaryOp, namespace: dict[str, Any]) -> int | float:
    if not isinstance(node.op, ast.USub):
        raise _NotPlainData(f"`{_snippet(node)}`: only unary minus is read")
    return _checked_number(-_number_operand(node.operand, namespace), node)


def _arithmetic(node: ast.BinOp, namespace: dict[str, Any]) -> int | float:
    """``+ - * /`` on numbers only (configs write ``lr=0.02 / 8``); no repetition of strings or lists."""
    apply = _ARITHMETIC.get(type(node.op))
    if apply is None:
        raise _NotPlainData(f"`{_snippet(node)}`: only + - * / on numbers are read")
    try:
        result = apply(_number_operand(node.left, namespace), _number_operand(node.right, namespace))
    except ArithmeticError as error:
        raise _NotPlainData(f"`{_snippet(node)}`: {error}") from None
    return _checked_number(result, node)


def _number_operand(node: ast.expr, namespace: dict[str, Any]) -> int | float:
    value = _evaluate(node, namespace)
    if type(value) not in (int, float):
        raise _NotPlainData(f"`{_snippet(node)}` is not a number")
    return value


def _checked_number(value: int | float, node: ast.expr) -> int | float:
    """Refuse integers no config needs, so crafted text cannot make the reader multiply huge numbers."""
    if type(value) is int and value.bit_length() > _MAX_INT_BITS:
        raise _NotPlainData(f"`{_snippet(node)}` is out of range")
    return value


_READERS: dict[type[ast.AST], Callable[[Any, dict[str, Any]], Any]] = {
    ast.Constant: _constant,
    ast.Name: _name,
    ast.List: _list,
    ast.Tuple: _tuple,
    ast.Dict: _dict_display,
    ast.Call: _dict_call,
    ast.UnaryOp: _negative,
    ast.BinOp: _arithmetic,
}


def _snippet(node: ast.AST) -> str:
    """The source of a node, on one line and short, for a reason a user reads."""
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= _SNIPPET_CHARS else text[: _SNIPPET_CHARS - 3] + "..."


def test_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings an export must match, from an mmdet 2 or mmdet 3 config dict; only the keys found.

    See the module docstring for the keys and their types. Values of the wrong type are left out
    rather than guessed at: the config is untrusted input, and the caller falls back to its recipe.
    """
    model = _dict_or_empty(cfg.get("model"))
    # mmdet <= 2.3 kept test_cfg beside the model; later versions moved it inside.
    test_cfg = _dict_or_empty(model.get("test_cfg") or cfg.get("test_cfg"))
    found = {
        **_detection_settings(test_cfg),
        **_proposal_settings(_dict_or_empty(test_cfg.get("rpn"))),
        **_test_size_settings(cfg),
        **_anchor_settings(model),
        "num_classes": _num_classes(model),
        "classes": _class_names(cfg),
    }
    return {key: value for key, value in found.items() if value is not None}


test_settings.__test__ = False  # type: ignore[attr-defined]  # a library function, not a pytest test


def _detection_settings(test_cfg: dict[str, Any]) -> dict[str, Any]:
    """Final detections: two-stage models keep them under ``rcnn``, one-stage ones at the top of test_cfg."""
    stage = _first_dict(test_cfg.get("rcnn")) or test_cfg
    return {
        "score_threshold": _real(stage.get("score_thr")),
        "max_per_img": _count(stage.get("max_per_img")),
        "nms_pre": _count(test_cfg.get("nms_pre")),
        **_nms_settings(_dict_or_empty(stage.get("nms"))),
    }


def _nms_settings(nms: dict[str, Any]) -> dict[str, Any]:
    """mmcv's nms config: ``iou_threshold`` (``iou_thr`` before mmdet 2.4); soft-NMS adds its own knobs."""
    return {
        "nms_type": _type_name(nms),
        "nms_iou": _real(_first_present(nms.get("iou_threshold"), nms.get("iou_thr"))),
        "min_score": _real(nms.get("min_score")),
        "nms_sigma": _real(nms.get("sigma")),
        "nms_method": _text(nms.get("method")),
    }


def _proposal_settings(rpn: dict[str, Any]) -> dict[str, Any]:
    """RPN proposals; mmdet before 2.4 wrote ``max_num`` and ``nms_thr`` instead of ``max_per_img`` and ``nms``."""
    nms = _dict_or_empty(rpn.get("nms"))
    return {
        "rpn_max_per_img": _count(_first_present(rpn.get("max_per_img"), rpn.get("max_num"))),
        "rpn_nms_pre": _count(rpn.get("nms_pre")),
        "rpn_iou": _real(_first_present(nms.get("iou_threshold"), nms.get("iou_thr"), rpn.get("nms_thr"))),
    }


_PIPELINE_PATHS = (
    ("data", "test", "pipeline"),  # mmdet 2
    ("test_dataloader", "dataset", "pipeline"),  # mmdet 3
    ("test_pipeline",),  # the variable both write before putting it in the dataset
)


def _test_size_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The test resize, from the pipeline the test dataset runs, else the config's ``img_scale`` variable."""
    for path in _PIPELINE_PATHS:
        pipeline = _dig(cfg, *path)
        if isinstance(pipeline, list | tuple):
            found = _size_from_pipeline(pipeline)
            if found:
                return found
    return _sizes_entry(_scales(cfg.get("img_scale")))


def _size_from_pipeline(pipeline: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    """mmdet 2: ``MultiScaleFlipAug(img_scale=...)`` wrapping a ``Resize``; mmdet 3: ``Resize(scale=...)``."""
    for step in pipeline:
        if not isinstance(step, dict):
            continue
        kind = _type_name(step)
        if kind == "MultiScaleFlipAug":
            scales = _scales(step.get("img_scale"))
            resize = _find_step(step.get("transforms"), "Resize")
        elif kind == "Resize":
            scales = _scales(_first_present(step.get("scale"), step.get("img_scale")))
            resize = step
        else:
            continue
        if scales:
            keep_ratio = resize.get("keep_ratio")
            return {**_sizes_entry(scales), **({"keep_ratio": keep_ratio} if isinstance(keep_ratio, bool) else {})}
    return {}


def _find_step(transforms: Any, kind: str) -> dict[str, Any]:
    steps = transforms if isinstance(transforms, list | tuple) else ()
    return next((step for step in steps if isinstance(step, dict) and _type_name(step) == kind), {})


def _scales(value: Any) -> list[tuple[int, int]]:
    """mmdet's scales as (H, W): it writes one ``(w, h)`` (long side first), a list of them, or one int."""
    if _count(value) is not None and value > 0:
        return [(value, value)]
    if _is_size_pair(value):
        return [(value[1], value[0])]
    if isinstance(value, list | tuple) and value and all(_is_size_pair(item) for item in value):
        return [(item[1], item[0]) for item in value]
    return []


def _is_size_pair(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(_count(v) is not None and v > 0 for v in value)


def _sizes_entry(scales: list[tuple[int, int]]) -> dict[str, Any]:
    """One scale is the export's size; several mean a multi-scale test, which one graph cannot reproduce."""
    if len(scales) == 1:
        return {"test_size": scales[0]}
    return {"test_sizes": scales} if scales else {}


def _anchor_settings(model: dict[str, Any]) -> dict[str, Any]:
    """Anchors of the RPN (two-stage) or of the dense head (one-stage, e.g. RetinaNet's octave scales)."""
    generator = _anchor_generator(model)
    scales = _numbers(generator.get("scales"))
    if scales is None:
        scales = _octave_scales(generator.get("octave_base_scale"), generator.get("scales_per_octave"))
    return {
        "anchor_scales": scales,
        "anchor_ratios": _numbers(generator.get("ratios")),
        "anchor_strides": _numbers(generator.get("strides")),
    }


def _anchor_generator(model: dict[str, Any]) -> dict[str, Any]:
    """``<head>.anchor_generator``, or that of the first stage that has one (Cascade RPN, CFINet's CRPNHead)."""
    for head_key in ("rpn_head", "bbox_head"):
        head = _first_dict(model.get(head_key))
        stages = head.get("stages")
        candidates = [head, *(stages if isinstance(stages, list | tuple) else ())]
        for candidate in candidates:
            generator = _dict_or_empty(_dig(candidate, "anchor_generator"))
            if generator:
                return generator
    return {}


def _octave_scales(base: Any, per_octave: Any) -> list[float] | None:
    """RetinaNet's scales as mmdet's AnchorGenerator computes them: base * 2**(i / scales_per_octave)."""
    if _real(base) is None or _count(per_octave) is None or per_octave <= 0:
        return None
    return [base * 2 ** (i / per_octave) for i in range(per_octave)]


def _num_classes(model: dict[str, Any]) -> int | None:
    """The box head's classes: under ``roi_head`` (the first of Cascade's stages) or the one-stage head."""
    head = _first_dict(_dig(model, "roi_head", "bbox_head")) or _dict_or_empty(model.get("bbox_head"))
    return _count(head.get("num_classes"))


def _class_names(cfg: dict[str, Any]) -> list[str] | None:
    """Class names if the config names them (mmdet 2 ``data.test.classes``, mmdet 3 ``metainfo.classes``)."""
    for path in (("data", "test", "classes"), ("test_dataloader", "dataset", "metainfo", "classes")):
        names = _dig(cfg, *path)
        if isinstance(names, list | tuple) and names and all(isinstance(name, str) for name in names):
            return list(names)
    return None


def _dig(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or None where a level is missing or not a dict (configs differ by version)."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _first_dict(value: Any) -> dict[str, Any]:
    """A head config, or the first of a list of them (Cascade R-CNN's per-stage bbox heads)."""
    if isinstance(value, list | tuple) and value:
        value = value[0]
    return _dict_or_empty(value)


def _dict_or_empty(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _first_present(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _type_name(step: dict[str, Any]) -> str | None:
    """A config's ``type`` without its registry scope (``mmdet.Resize``, lazy ``mmcv.transforms.Resize``)."""
    kind = step.get("type")
    return kind.rpartition(".")[2] if isinstance(kind, str) else None


def _real(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None


def _count(value: Any) -> int | None:
    return value if type(value) is int else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _numbers(value: Any) -> list[int | float] | None:
    if isinstance(value, list | tuple) and value and all(type(v) in (int, float) for v in value):
        return list(value)
    return None
