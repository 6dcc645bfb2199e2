"""The quantize step end to end: FP32 export -> FP16 or INT8 ONNX + sidecar, and how far it moved.

model.onnx (+ model.json) -> graph roles -> calibration images -> ranges
  -> FP16 autocast (fp16.py) or INT8 Q/DQ (int8.py)
  -> FP32 vs quantized in onnxruntime on seeded inputs (a report, not a gate)
  -> <stem>.fp16.onnx / <stem>.int8.onnx + sidecar, written together or not at all
  -> optional per-layer INT8 sensitivity (sensitivity.py)
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from tod_deploy.artifacts import IOSpec, Sidecar
from tod_deploy.backends.onnxruntime_runner import load_onnx
from tod_deploy.cli import MAX_SIGN_FLIPS
from tod_deploy.errors import UserError
from tod_deploy.quant import calibration
from tod_deploy.quant.graph import GraphRoles, graph_roles, layers_read_only_by, match_patterns

if TYPE_CHECKING:
    from tod_deploy.quant.binary_inputs import SignCheck
    from tod_deploy.quant.int8 import Int8Layout

# torch, graph-surgeon and the export modules load inside the functions: a mistake on the command
# line (bad set, bad image, bad option) is reported before those seconds of imports.

Log = Callable[[str], None]
PRECISIONS = ("fp16", "int8")
PROBE_IMAGES = 2  # FP16 range probe: a couple of calibration samples find the large-range tensors
SIGN_CHECK_BATCHES = 2  # calibration batches the 1-bit input sign check runs on


@dataclass
class QuantizeResult:
    output: Path
    sidecar_path: Path
    sidecar: Sidecar
    comparison: Any  # parity.report.ParityReport (gate off: how far the quantized file moved)
    sensitivity: Any = None  # SensitivityReport with --report


def compared_tensors(model: onnx.ModelProto, dense_only: bool = False) -> list[str]:
    """Tensors worth comparing element-wise: the export's parity tensors (dense head maps, before any NMS or
    top-k) and, unless ``dense_only``, its raw tensors (which may follow NMS, so a reordering counts as error)."""
    from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS

    meta = {p.key: p.value for p in model.metadata_props}
    names: list[str] = []
    for key in ("parity_tensors",) if dense_only else ("parity_tensors", "raw_tensors"):
        try:
            names += [str(n) for n in json.loads(meta.get(key, "[]"))]
        except json.JSONDecodeError:
            continue
    produced = {t for n in model.graph.node for t in n.output}
    return [n for n in dict.fromkeys(names) if n in produced and n not in CONTRACT_OUTPUTS]


def compare_models(
    fp32: onnx.ModelProto,
    quantized: onnx.ModelProto,
    sidecar: Sidecar,
    precision: str,
    seeds=(0, 1, 2),
    integer_kernels: bool = False,
) -> Any:
    """FP32 and quantized in onnxruntime on the same seeded inputs, by the shared comparator with the
    precision's policy (a report, not a gate): per-tensor errors, threshold flips, detection agreement.
    ``integer_kernels``: run INT8 through onnxruntime's integer kernels (its graph optimizer on), as a
    file laid out for onnxruntime runs in deployment."""
    from tod_deploy.backends.onnxruntime_runner import OnnxRuntimeRunner
    from tod_deploy.export.passes import expose_tensors
    from tod_deploy.export.verify import plan_for
    from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS
    from tod_deploy.parity.comparator import compare, verification_images
    from tod_deploy.parity.decisions import decision_sites
    from tod_deploy.parity.policy import PRECISION_POLICIES

    recipe = sidecar.recipe
    names = compared_tensors(fp32)
    graph_outputs = [o.name for o in fp32.graph.output]
    dense = names + [n for n in graph_outputs if n not in CONTRACT_OUTPUTS and n not in names]
    produced = {t for n in quantized.graph.node for t in n.output}
    sites = [
        s for s in decision_sites(fp32)
        if s.kind == "threshold" and s.input in produced and s.output in produced
    ]  # fmt: skip
    exposed = list(dict.fromkeys([*names, *(t for s in sites for t in (s.input, s.output))]))
    ref_runner = OnnxRuntimeRunner(expose_tensors(fp32, exposed))
    # The TensorRT layout runs as the file defines it (DequantizeLinear then float ops, what TensorRT's
    # kernels approximate), not through onnxruntime's int8 kernels: with its full-range int8 weights,
    # those saturate 16-bit partial sums without VNNI (an AVX2-only CPU), measured: ThumbDet's logits
    # 0.76 off instead of 0.115. The onnxruntime layout's 7-bit weights do not saturate.
    got_runner = OnnxRuntimeRunner(expose_tensors(quantized, exposed), optimize=precision != "int8" or integer_kernels)
    got_runner.backend = f"onnxruntime {precision}"
    batch = 1 if recipe.batch == "dynamic" else int(recipe.batch)
    inputs = [verification_images(recipe, batch, seed) for seed in seeds]
    plan = plan_for(fp32, recipe, dense, sites)
    return compare(ref_runner, got_runner, inputs, plan, PRECISION_POLICIES[precision])


def _validate(model_path: Path, precision: str, method: str, calib_size: int | None, max_sign_flips: float) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", f"use one of: {', '.join(PRECISIONS)}")
    if method not in calibration.METHODS:
        raise UserError(f"unknown calibration method {method!r}", f"use one of: {', '.join(calibration.METHODS)}")
    if calib_size is not None and calib_size < 1:
        raise UserError(f"--calib-size {calib_size} is not a number of images", "pass --calib-size 1 or more")
    if not 0 <= max_sign_flips <= 1:
        raise UserError(f"--max-sign-flips {max_sign_flips} is not a share", "pass a number from 0 to 1, e.g. 0.001")
    if model_path.suffix.lower() != ".onnx":
        raise UserError(f"{model_path} is not an ONNX file", "pass the .onnx file that tod-deploy export wrote")
    if not model_path.is_file():
        raise UserError(f"{model_path} does not exist", "pass the .onnx file that tod-deploy export wrote")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def quantize_model(
    model_path: Path,
    precision: str,
    calib: Path | str | None = None,
    calib_size: int | None = None,
    method: str | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    seed: int = 0,
    output: Path | None = None,
    report: bool = False,
    report_limit: int | None = None,
    log: Log = print,
    show_progress: bool = True,
    target: str = "tensorrt",
    max_sign_flips: float = MAX_SIGN_FLIPS,
    weight_bits: int | None = None,
) -> QuantizeResult:
    """``target``: the runtime the INT8 file is laid out for (``quant.int8.INT8_LAYOUTS``); FP16 is one file.
    ``max_sign_flips``: INT8 only; a real layer in front of 1-bit layers runs in INT8 when its rounding
    flips at most this share of their input signs (quant.binary_inputs); 0 keeps them all FP32.
    ``method``: INT8 calibration (None: the layout's own, ``Int8Layout.calibration``).
    ``weight_bits``: INT8 weights' bits (None: the layout's own; 8 with ``target`` onnxruntime: see quant.int8)."""
    from tod_deploy.quant.int8 import int8_layout

    model_path = Path(model_path)
    if weight_bits is not None and precision != "int8":
        raise UserError("--weight-bits sets INT8 weights", "use it with --precision int8")
    layout = int8_layout(target, weight_bits)
    method = method or layout.calibration
    _validate(model_path, precision, method, calib_size, max_sign_flips)
    if report and precision != "int8":
        raise UserError("--report measures INT8 per-layer sensitivity", "use it with --precision int8")
    if report_limit is not None and report_limit < 1:
        raise UserError(f"--report-limit {report_limit} is not a number of layers", "pass 1 or more")
    # The calibration set first: a missing, altered or unreadable image is found before the model loads.
    cal_set = calibration.read_calibration_set(calibration.resolve_set(calib), decode=True)

    exported = load_onnx(model_path)
    source_precision = next((p.value for p in exported.metadata_props if p.key == "precision"), "fp32")
    if source_precision != "fp32":
        raise UserError(f"{model_path.name} is already {source_precision}", "quantize the FP32 export instead")
    model, sub_pixel = exported, []
    if precision == "int8" and layout.sub_pixel:
        from tod_deploy.quant.subpixel import split_transposed_convs

        model, sub_pixel = split_transposed_convs(exported)
        if sub_pixel:
            log(f"{len(sub_pixel)} transposed convs as sub-pixel convs, so that they run on integers")
    roles = graph_roles(model)
    by_regex = match_patterns(list(exclude), [n.name for n in model.graph.node])
    regex_nodes = list(dict.fromkeys(n for hits in by_regex.values() for n in hits))

    from tod_deploy.artifacts import sidecar_path, staged

    sidecar = Sidecar.load(model_path)
    recipe = sidecar.recipe
    batch = 1 if recipe.batch == "dynamic" else int(recipe.batch)

    batches = calibration.calibration_batches(cal_set, recipe.input_size, batch, calib_size, seed)
    log(f"calibration set {cal_set.folder}: {len(cal_set.files)} images, {len(batches) * batch} samples (seed {seed})")

    ranges = None
    keep_fp32: dict[str, list[str]] = {}
    sign_checks: list[SignCheck] = []
    int8_feeders: list[str] = []
    if precision == "fp16":
        from tod_deploy.quant.fp16 import large_range_nodes, to_fp16

        probe = calibration.compute_ranges(
            model, batches[:PROBE_IMAGES], "max", None, show_progress, "probing tensor ranges"
        )
        big = large_range_nodes(model, probe)
        keep_fp32 = {
            "post-processing": roles.tail,
            "tod custom op": roles.custom,
            "feeds a 1-bit layer": roles.binarized_upstream,
            "large range": sorted(big),
            "--exclude": regex_nodes,
        }
        keep = list(dict.fromkeys(n for names in keep_fp32.values() for n in names))
        log(f"FP16 autocast: {len(keep)} of {len(model.graph.node)} nodes kept in FP32")
        quantized = to_fp16(model, keep)
    else:
        from tod_deploy.quant.int8 import qdq_summary

        ranges = calibration.compute_ranges(
            model, batches, method, list(layout.op_types), show_progress, f"calibrating ({method})",
            symmetric=layout.activation_symmetric,
        )  # fmt: skip
        defaults = roles.default_fp32()
        keep_fp32 = {
            "stem": defaults["stem"],
            "last layer of a head": defaults["last layer of a head"],
            "feeds a threshold (Sign)": defaults["feeds a threshold (Sign)"],
            "feeds a 1-bit layer": defaults["feeds a 1-bit layer"],
            "tod custom op": roles.custom,
            "--exclude": [n for n in regex_nodes if n in set(roles.layers)],
        }
        others = {n for reason, names in keep_fp32.items() if reason != "feeds a 1-bit layer" for n in names}
        candidates = [n for n in keep_fp32["feeds a 1-bit layer"] if n not in others]
        trial = None
        if candidates and max_sign_flips > 0:
            from tod_deploy.quant.binary_inputs import check_signs

            trial = _int8(model, ranges, roles, keep_fp32, candidates, regex_nodes, layout)
            progress, task = calibration.progress_bar(len(candidates), "checking 1-bit input signs", show_progress)
            with progress:
                sign_checks = check_signs(
                    model, trial, candidates, batches[:SIGN_CHECK_BATCHES], max_sign_flips,
                    lambda _n: progress.advance(task),
                )  # fmt: skip
            int8_feeders = [c.layer for c in sign_checks if c.int8]
            keep_fp32["feeds a 1-bit layer"] = [n for n in keep_fp32["feeds a 1-bit layer"] if n not in int8_feeders]
            log(f"1-bit input signs: {len(int8_feeders)} of {len(candidates)} real layers in front of 1-bit layers "
                f"flip at most {max_sign_flips:.2%} of their signs alone and run in INT8")  # fmt: skip
        # the trial is already the file when every candidate passed: the same call, the same arguments
        same = trial is not None and int8_feeders == candidates
        quantized = trial if same else _int8(model, ranges, roles, keep_fp32, int8_feeders, regex_nodes, layout)
        summary = qdq_summary(quantized)
        log(f"INT8 Q/DQ for {layout.target}: {len(summary.quantized_layers)} of {len(roles.layers)} "
            f"Conv/MatMul/Gemm layers quantized")  # fmt: skip
    _stamp(quantized, precision)
    onnx.checker.check_model(quantized, full_check=False)

    comparison = compare_models(exported, quantized, sidecar, precision, integer_kernels=layout.target == "onnxruntime")

    out_path = Path(output) if output is not None else model_path.with_name(f"{model_path.stem}.{precision}.onnx")
    if out_path.resolve() == model_path.resolve():
        raise UserError(f"--output {out_path} is the input model", "write the quantized model to another file")
    payload = quantized.SerializeToString()
    info = _sidecar(sidecar, model_path, quantized, payload, out_path)
    info["quantization"] = {
        "precision": precision,
        "tool": "onnxconverter-common float16" if precision == "fp16" else "onnxruntime quantize_static (QDQ)",
        "method": method if precision == "int8" else None,
        "symmetric": precision == "int8" and layout.activation_symmetric,
        "per_channel_weights": precision == "int8",
        "layout": layout.to_dict() if precision == "int8" else None,
        "calibration": {**cal_set.to_dict(), "samples": len(batches) * batch, "seed": seed},
        "exclude_patterns": by_regex,
        "kept_fp32": keep_fp32,
        "sign_check": {
            "max_flips": max_sign_flips,
            "layers": {c.layer: c.to_dict() for c in sign_checks},
        }
        if sign_checks
        else None,
        "sub_pixel_convs": sub_pixel,
        "comparison": comparison.to_dict(),
    }
    if precision == "int8":
        info["quantization"]["qdq"] = summary.to_dict()
    sensitivity = None
    if report:
        from tod_deploy.quant.activation_sqnr import activation_sqnr

        sensitivity = _sensitivity(model, ranges, roles, regex_nodes, batches, report_limit, show_progress)
        sensitivity.tensors = activation_sqnr(model, quantized, batches[:2])
        info["quantization"]["sensitivity"] = {
            k: v for k, v in sensitivity.to_dict().items() if k not in ("rows", "tensors")
        }  # rows go to --json
    side = sidecar_path(out_path)
    with staged(out_path, side) as (tmp_onnx, tmp_json):
        tmp_onnx.write_bytes(payload)
        quantized_sidecar = Sidecar(info)
        quantized_sidecar.save(tmp_json)
    return QuantizeResult(out_path, side, quantized_sidecar, comparison, sensitivity)


def _int8(
    model: onnx.ModelProto,
    ranges: Any,
    roles: GraphRoles,
    keep_fp32: dict[str, list[str]],
    int8_feeders: list[str],
    regex_nodes: list[str],
    layout: Int8Layout,
) -> onnx.ModelProto:
    """The Q/DQ file: ``keep_fp32``'s layers (but ``int8_feeders``) in FP32, the rest laid out for ``layout``."""
    from tod_deploy.quant.int8 import qdq_quantize

    keep = [n for names in keep_fp32.values() for n in names if n not in int8_feeders]
    reads_float = [*keep, *roles.tail]
    if layout.between_layers:
        # The arithmetic of post-processing, of a threshold's input and of a 1-bit layer's input stays
        # float for the same reasons as the layers there. Only what feeds a decision (or was excluded by
        # name) reads the unquantized tensor: a kept last layer or a RoiAlign reading a quantized layer's
        # output through its DequantizeLinear leaves that layer ending in a QuantizeLinear alone, which
        # onnxruntime needs to run it as QLinearConv (measured: BH's RPN convs, 9.7 GMAC on P2 alone,
        # stayed float Conv otherwise).
        decisions = [*roles.threshold_arithmetic, *roles.binarized_upstream, *roles.custom, *regex_nodes]
        # Sampling positions (Deformable-DETR's reference points plus offsets, GridSample's grid) stay float
        # too: in uint8 a position in [0, 1] moves by up to 1/510 of the map, and onnxruntime's broadcasting
        # QLinearAdd there cost ThumbDet 4x 29 ms of its 220 (6 encoder layers, 4.8 ms each, measured). So
        # does the attention-weighted sum of GridSample's (float) samples: quantizing them for QLinearMul and
        # dequantizing the products for ReduceSum cost ThumbDet 4x 21 ms more than float (measured: 199.3
        # -> 177.5 ms at 800x1333, 2 threads, Xeon).
        decisions += roles.sampling_arithmetic
        # Softmax too (Deformable-DETR's attention weights): onnxruntime fuses DequantizeLinear -> Softmax ->
        # QuantizeLinear into QLinearSoftmax, slower than float Softmax (ThumbDet 4x's 16: 3.8 vs 1.2 ms; its
        # INT8 172.0 -> 166.7 ms, measured). Elsewhere Softmax is post-processing, float already.
        decisions += [name for name, op in roles.op_types.items() if op == "Softmax"]
        decisions = [n for n in decisions if n not in int8_feeders]
        # A layer whose output only those float readers read (Deformable-DETR's sampling offsets, which go to
        # the reference points) runs in float in onnxruntime whatever its Q/DQ: onnxruntime fuses its MatMul
        # and bias Add into a float Gemm and dequantizes the int8 weights on every run (ThumbDet 4x: 11 such
        # 256x256 weights, 2.3 ms of its 37 at 256x256, measured). It keeps its float weights instead, and
        # reads its input as the INT8 layers beside it do, so the op writing that input stays integer. (A
        # product of two activations there, the decoder's query-key MatMul, has no weights and still runs as
        # onnxruntime's MatMulIntegerToFloat.)
        layers, weights = set(roles.layers), {i.name for i in model.graph.initializer}
        weighted = [n.name for n in model.graph.node if n.name in layers and n.input[1] in weights]
        float_out = [n for n in layers_read_only_by(model, weighted, set(decisions)) if n not in int8_feeders]
        keep = [*keep, *roles.tail, *decisions, *float_out]
        reads_float = decisions
    return qdq_quantize(
        model, ranges, nodes_to_exclude=list(dict.fromkeys(keep)), keep_float_inputs=list(dict.fromkeys(reads_float)),
        layout=layout, int8_writers=int8_feeders,
    )  # fmt: skip


def _stamp(model: onnx.ModelProto, precision: str) -> None:
    for prop in model.metadata_props:
        if prop.key == "precision":
            prop.value = precision
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = "precision", precision


def _sidecar(
    source: Sidecar,
    source_path: Path,
    quantized: onnx.ModelProto,
    payload: bytes,
    out_path: Path,
) -> dict[str, Any]:
    info = source.to_dict()
    info["io"] = IOSpec.of_onnx(quantized).to_dict()
    info["onnx"] = {
        **source.get("onnx", {}),
        "file": out_path.name,
        "bytes": len(payload),
        "sha256": _sha256(payload),
        "ir_version": quantized.ir_version,
        "nodes": len(quantized.graph.node),
        "ops": dict(Counter(node.op_type for node in quantized.graph.node).most_common()),
    }
    info["source"] = {"file": source_path.name, "sha256": _sha256(source_path.read_bytes())}
    info["verification"] = None  # PyTorch parity is the FP32 export's; see quantization.comparison
    return info


def _sensitivity(
    model: onnx.ModelProto,
    ranges: Any,
    roles: GraphRoles,
    regex_nodes: list[str],
    batches: list[np.ndarray],
    limit: int | None,
    show_progress: bool,
) -> Any:
    from tod_deploy.quant.int8 import qdq_quantize
    from tod_deploy.quant.sensitivity import layer_sensitivity

    role = {n: "threshold" for n in roles.threshold_layers} | {n: "last layer" for n in roles.last_layers}
    role |= {n: "--exclude" for n in regex_nodes}
    if roles.stem:
        role[roles.stem] = "stem"
    layers = roles.layers[:limit] if limit else list(roles.layers)
    full = qdq_quantize(model, ranges, nodes_to_exclude=roles.custom)
    compared = compared_tensors(model, dense_only=True) or compared_tensors(model)
    progress, task = calibration.progress_bar(len(layers), "per-layer sensitivity", show_progress)
    with progress:
        return layer_sensitivity(
            model, full, layers, role, batches[:2], compared, lambda _n: progress.advance(task),
            total_layers=len(roles.layers),
        )  # fmt: skip
