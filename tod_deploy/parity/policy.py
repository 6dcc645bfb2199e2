"""How close two runtimes must agree: tolerances per precision, passed in, never re-coded.

An element fails only when its error exceeds both ``atol`` and ``rtol * |reference|`` (as
Polygraphy's default comparison does); for a dense tensor (not in pixels) ``atol`` is at least
``scale_rtol`` times the tensor's RMS (:meth:`ParityPolicy.dense_atol`). Detections match when
label, IoU and score agree.
Quantized files are compared with looser presets and as a report (``gate=False``): their
errors are a property of the precision, not a defect of the export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A coordinate computed from values up to the image extent E (anchor centre +- half its size, clipped)
# is exact to a few float32 rounding steps of E: 16 ulps (16 * 2**-23 * E, 4.9e-4 px at 256, 2.3e-3 at
# 1216), whatever the coordinate itself is; seen: 1.5e-4 px at 256, 3.1e-4 px at 1216 (CFINet).
PIXEL_ULPS = 16


@dataclass(frozen=True)
class ParityPolicy:
    atol: float = 1e-4
    rtol: float = 1e-3
    min_iou: float = 0.99  # a detection matches with IoU at least this ...
    score_tol: float = 1e-3  # ... and a score within this
    # Scores this close to a selection boundary (the K-th score, the score threshold, an overlapping
    # box at NMS) may be selected differently by two correct runtimes (decisions.py).
    selection_margin: float = 1e-4
    # Excused selection differences must stay rare: more than this share of the checked detections
    # means a real error, however close each one looked.
    max_excused_share: float = 0.01
    gate: bool = True  # False: report only (quantized files)
    # An element near 0 of a tensor whose values are O(RMS) is a sum of many O(RMS) terms, and two
    # correct runtimes round those sums differently: its error scales with the tensor, not with the
    # element. Seen: SR-TOD's rpn_bbox_deltas (RMS 3.7) differed by 1.08e-4 (2.9e-5 of the RMS) on an
    # AVX2-only AMD EPYC, where onnxruntime's conv kernels are not the AVX-512 ones. 1e-4 of the RMS
    # still fails a shifted bias or a corrupted weight by orders of magnitude (tests/test_verify.py).
    scale_rtol: float = 1e-4

    def tolerance(self, input_size: tuple[int, int] | None = None) -> tuple[float, float]:
        """(atol, rtol) of a tensor; with ``input_size``, of one in input pixels (see PIXEL_ULPS)."""
        if input_size is None:
            return self.atol, self.rtol
        pixel = PIXEL_ULPS * float(np.finfo(np.float32).eps) * max(input_size)
        return max(self.atol, pixel), self.rtol

    def dense_atol(self, atol: float, ref: np.ndarray) -> float:
        """``atol`` for one dense tensor: at least ``scale_rtol`` of the reference's RMS (see above)."""
        finite = ref[np.isfinite(ref)].astype(np.float64)
        rms = float(np.sqrt(np.mean(finite**2))) if finite.size else 0.0
        return max(atol, self.scale_rtol * rms)

    def within(self, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> np.ndarray:
        """Element-wise: is ``got`` within tolerance of ``ref``? (NaN or Inf in ``got`` never is.)"""
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        err = np.abs(ref64 - got64)
        return ((err <= atol) | (err <= rtol * np.abs(ref64))) & np.isfinite(got64)


FP32 = ParityPolicy()
PRECISION_POLICIES = {
    "fp32": FP32,
    "fp16": ParityPolicy(atol=1e-2, rtol=1e-2, min_iou=0.9, score_tol=0.01, gate=False),
    "int8": ParityPolicy(atol=1e-1, rtol=1e-1, min_iou=0.5, score_tol=0.05, gate=False),
    # a runtime computing in bfloat16 (8 significant bits, fewer than fp16's 11): the quantized files' terms
    "bf16": ParityPolicy(atol=1e-1, rtol=1e-1, min_iou=0.5, score_tol=0.05, gate=False),
}
