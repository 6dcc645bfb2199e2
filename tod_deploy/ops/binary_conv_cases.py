"""The configurations every ``tod::BinaryConv2d`` implementation is checked over, defined once.

Why a package module and not test code: the tests (the CPU kernel on every ISA path, the CUDA
kernel's host emulation) and ``tod-deploy doctor --gpu`` (the same CUDA kernel on a real GPU) walk
this one grid, so "bit-exact over the grid" means the same thing in all three places.

Inputs on a 0.25 grid (``ties=True``) put many activations exactly on the threshold and on 0, which
is where the sign conventions (``zero_sign``) and the padding value differ.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from tod_deploy.ops.binary_conv_ref import BinaryConvAttrs

SIGNS = (-1, 0, 1)  # the values of both zero_sign and pad_value


@dataclass(frozen=True)
class Geometry:
    """One convolution shape and threshold; ``attrs`` adds the sign conventions."""

    c: int
    cout: int
    h: int
    w: int
    k: int = 3
    stride: int = 1
    dilation: int = 1
    pads: tuple[int, int, int, int] = (1, 1, 1, 1)
    group: int = 1
    threshold: float = 0.0
    ties: bool = True  # inputs on a 0.25 grid (exact threshold hits) or continuous

    def attrs(self, zero_sign: int, pad_value: int) -> BinaryConvAttrs:
        return BinaryConvAttrs(
            kernel_shape=(self.k, self.k),
            in_channels=self.c,
            strides=(self.stride, self.stride),
            pads=self.pads,
            dilations=(self.dilation, self.dilation),
            group=self.group,
            threshold=self.threshold,
            zero_sign=zero_sign,
            pad_value=pad_value,
        )


# The CPU kernel's grid: odd channel counts, strides, dilations, asymmetric pads, groups, 1x1 and 5x5.
GEOMETRIES = [
    Geometry(3, 5, 7, 9),
    Geometry(17, 33, 9, 8, stride=2, threshold=0.5),
    Geometry(33, 17, 10, 11, dilation=2, pads=(2, 2, 2, 2), threshold=-0.25),
    Geometry(65, 9, 8, 9, stride=2, dilation=2, pads=(0, 1, 2, 3)),
    Geometry(100, 33, 6, 7, threshold=0.25),
    Geometry(128, 16, 5, 6),  # two full words per tap
    Geometry(34, 18, 7, 7, group=2),  # 17 channels per group
    Geometry(17, 12, 6, 41, k=1, pads=(0, 0, 0, 0)),  # 1x1, rows wider than one SIMD tile
    Geometry(16, 8, 5, 37, k=5, pads=(2, 2, 2, 2), ties=False),  # interior tiles unmasked, borders masked
]

# The CUDA kernel's grid: the CPU kernel's plus tiles the kernel splits: 2 channel tiles per group,
# K of exactly one 256-bit chunk per tap, several position tiles with stride 2.
CUDA_CASES = [
    *GEOMETRIES,
    Geometry(64, 70, 9, 10, stride=2, group=2),
    Geometry(256, 40, 4, 5, pads=(1, 0, 1, 0), threshold=-0.5),
]

# NaN activations (they binarize to zero_sign), activations exactly on a nonzero threshold, zero bias.
EDGE_CASE = Geometry(19, 7, 6, 30, threshold=0.25)

# The four ResNet-18 3x3 stage convolutions at an 800x800 input: (channels, side); stride 1, pad 1,
# Cout = Cin, batch 1 (the shapes of benchmarks/binary_conv.py and doctor --gpu's timings).
RESNET18_STAGES = ((64, 200), (128, 100), (256, 50), (512, 25))


def case_id(geo: Geometry) -> str:
    return f"c{geo.c}o{geo.cout}k{geo.k}s{geo.stride}d{geo.dilation}g{geo.group}"


def sign_pairs() -> list[tuple[int, int]]:
    """Every (zero_sign, pad_value) pair each geometry is checked with."""
    return list(itertools.product(SIGNS, SIGNS))


def make_inputs(geo: Geometry, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded X [2, C, H, W], latent weights, alpha > 0 and bias, all float32."""
    rng = np.random.default_rng(seed)
    if geo.ties:
        x = rng.integers(-4, 5, size=(2, geo.c, geo.h, geo.w)).astype(np.float32) * 0.25
    else:
        x = rng.standard_normal((2, geo.c, geo.h, geo.w)).astype(np.float32)
    w = rng.standard_normal((geo.cout, geo.c // geo.group, geo.k, geo.k)).astype(np.float32)
    alpha = (rng.random(geo.cout) + 0.05).astype(np.float32)
    bias = rng.standard_normal(geo.cout).astype(np.float32)
    return x, w, alpha, bias


def edge_case_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """EDGE_CASE's X (with NaNs and exact threshold hits), weights, alpha and an all-zero bias."""
    x, w, alpha, _ = make_inputs(EDGE_CASE, seed=3)
    x[0, 2, 1, :5] = np.nan
    x[1, :, 0, :3] = np.float32(EDGE_CASE.threshold)
    return x, w, alpha, np.zeros(EDGE_CASE.cout, dtype=np.float32)


ACTIVATION_CASES = ("none", "relu", "prelu")


def epilogue_inputs(y: np.ndarray, activation: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """A residual for step 5's output ``y`` and, for prelu, slopes (some negative, one zero).

    Every seventh residual is ``-y``, so the sum is exactly 0 there (the activations' boundary), and
    the rest straddle 0, so both branches of each activation run.
    """
    rng = np.random.default_rng(seed)
    residual = rng.standard_normal(y.shape).astype(np.float32)
    residual.flat[::7] = -y.flat[::7]
    if activation != "prelu":
        return residual, None
    slope = rng.uniform(-0.5, 1.0, size=y.shape[1]).astype(np.float32)
    slope[0] = 0.0
    return residual, slope
