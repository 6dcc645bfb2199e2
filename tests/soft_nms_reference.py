"""A NumPy reference of mmcv's ``soft_nms``, shared by the soft-NMS and the bh SSPNet tests.

Written from mmcv's CPU kernel (``mmcv/ops/csrc/pytorch/cpu/nms.cpp``, ``softnms_cpu``, offset 0),
step for step and in float32, independently of ``tod_deploy.nn.soft_nms``: pick the first maximum
at or after position i, swap it into i, decay the later positions, and drop a score below
``min_score`` by moving the last element into its place.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def mmcv_soft_nms(
    boxes: np.ndarray, scores: np.ndarray, *, iou_threshold: float, min_score: float, method: str, sigma: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """mmcv's soft_nms: (kept indices, their scores at pick time), in pick order."""
    x1, y1, x2, y2 = (boxes[:, k].astype(F32).copy() for k in range(4))
    sc = scores.astype(F32).copy()
    areas = (x2 - x1) * (y2 - y1)
    inds = np.arange(len(sc))
    columns = (x1, y1, x2, y2, sc, areas, inds)
    n = len(sc)
    keep, kept = [], []
    i = 0
    while i < n:
        best = i + int(np.argmax(sc[i:n]))  # the first maximum, as the kernel's strict '<' scan finds it
        for col in columns:
            col[i], col[best] = col[best], col[i]
        keep.append(int(inds[i]))
        kept.append(sc[i])
        pos = i + 1
        while pos < n:
            w = max(F32(0), min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
            h = max(F32(0), min(y2[i], y2[pos]) - max(y1[i], y1[pos]))
            inter = F32(w * h)
            with np.errstate(invalid="ignore"):  # two zero-area boxes: 0 / 0, NaN in the C++ kernel too
                ovr = F32(inter / (areas[i] + areas[pos] - inter))
            if method == "linear":
                weight = F32(1) - ovr if ovr >= iou_threshold else F32(1)
            else:
                weight = np.exp(-(ovr * ovr) / F32(sigma))
            sc[pos] = F32(sc[pos] * weight)
            if sc[pos] < min_score:  # removed: the last element takes its place and is examined next
                for col in columns:
                    col[pos] = col[n - 1]
                n -= 1
                continue
            pos += 1
        i += 1
    return np.array(keep, dtype=np.int64), np.array(kept, dtype=F32)
