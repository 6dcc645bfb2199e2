"""Build of the compiled part of tod-deploy: the tod::BinaryConv2d CPU kernel.

Everything else (metadata, dependencies, packages) is in pyproject.toml. The kernel is built
with plain flags (no -march): the AVX2 and AVX-512 paths are compiled through function target
attributes and chosen at run time, so one build runs on any x86-64 and also builds on other
architectures (scalar path only).
"""

from __future__ import annotations

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = [
    "plugins/binary_conv2d/cpu/module.cpp",
    "plugins/binary_conv2d/cpu/binary_conv2d.cpp",
    "plugins/binary_conv2d/cpu/thread_pool.cpp",
    "plugins/binary_conv2d/cpu/kernels_scalar.cpp",
    "plugins/binary_conv2d/cpu/kernels_avx2.cpp",
    "plugins/binary_conv2d/cpu/kernels_avx512.cpp",
    "plugins/binary_conv2d/cpu/kernels_amx.cpp",
]

# -ffp-contract=off: the epilogue alpha * S + bias must round twice, as the NumPy reference does.
UNIX_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fvisibility=hidden", "-pthread"]
MSVC_FLAGS = ["/O2", "/std:c++17", "/fp:precise"]


class BuildExt(build_ext):
    """Pick flags by compiler family; the sources are the same everywhere."""

    def build_extensions(self) -> None:
        msvc = self.compiler.compiler_type == "msvc"
        for ext in self.extensions:
            ext.extra_compile_args = MSVC_FLAGS if msvc else UNIX_FLAGS
            ext.extra_link_args = [] if msvc else ["-pthread"]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "tod_deploy.ops._binary_conv_cpu",
            sources=SOURCES,
            include_dirs=["plugins/binary_conv2d"],
            depends=[
                "plugins/binary_conv2d/binary_conv2d_core.h",
                "plugins/binary_conv2d/cpu/binary_conv2d_cpu.h",
                "plugins/binary_conv2d/cpu/thread_pool.h",
            ],
            language="c++",
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
