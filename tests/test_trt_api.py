"""Every TensorRT call in trt/ against the TensorRT 11.4 binding itself (names and documented behaviour).

The compiled module of the ``tensorrt-cu13-bindings`` wheel cannot be loaded here (it needs
libnvinfer), but its names and docstrings are strings in the file: each attribute the builder and
runner use must be one of them, and the documented behaviour the code relies on is quoted from it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import tensorrt_standin as standin

from tod_deploy.errors import UserError
from tod_deploy.trt import builder, plugins, runner

pytestmark = standin.IGNORE_WHEEL_WARNINGS
TRT_DIR = Path(builder.__file__).parent
# Methods and properties called on TensorRT objects in trt/builder.py and trt/runner.py.
OBJECT_API = {
    "Builder": ["create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network"],
    "OnnxParser": ["parse", "num_errors", "get_error"],
    "ParserError": ["node_name", "node", "node_operator", "desc"],
    "IBuilderConfig": ["set_memory_pool_limit", "profiling_verbosity", "add_optimization_profile",
                       "create_timing_cache", "set_timing_cache", "get_timing_cache"],
    "ITimingCache": ["serialize"],
    "IOptimizationProfile": ["set_shape"],
    "Runtime": ["deserialize_cuda_engine"],
    "ICudaEngine": ["create_execution_context", "create_engine_inspector", "num_io_tensors", "get_tensor_name",
                    "get_tensor_mode", "get_tensor_dtype", "get_tensor_profile_shape"],
    "IEngineInspector": ["get_engine_information"],
    "IExecutionContext": ["set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3"],
}  # fmt: skip
# What the code relies on, as the 11.4 binding documents it.
DOCUMENTED = [
    "Deprecated in TensorRT 11.0. Strongly typed mode is always enabled. This flag is retained for API "
    "compatibility but is ignored.",
    ":returns: A `BOOL` indicating whether the operation is done successfully.",  # set_timing_cache
    "A failure will be reported if the CUDA device property in the provided cache is different from current "
    "environment.",
    ":returns: The :class:`ICudaEngine`, or None if it could not be deserialized.",
    ":returns: true if the model was parsed successfully",
    "If an empty cache is provided (i.e. ``b\"\"``),  a new cache will be created.",
]


@pytest.fixture(scope="module")
def binding() -> set[str]:
    return standin.compiled_core_strings(standin.python_layer_dir_or_skip())


def in_binding(binding: set[str], name: str) -> bool:
    """A name the binding registers: a string of its own, or the tail of a longer one (the linker
    merges string constants that end alike: "Builder" is stored as the end of "IExprBuilder")."""
    return any(s.endswith(name) for s in binding)


def trt_attribute_chains(path: Path) -> set[str]:
    """``trt.X.Y`` chains in a module, where ``trt`` is the imported TensorRT module."""
    chains = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            parts, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                parts.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "trt":
                chains.add(".".join(parts))
    return chains


def test_module_level_names_exist_in_the_binding(binding: set[str]) -> None:
    chains = set().union(*(trt_attribute_chains(TRT_DIR / name) for name in ("builder.py", "runner.py")))
    assert {"Builder", "OnnxParser", "Runtime"} <= {c.split(".")[0] for c in chains}
    python_layer = {"nptype", "__version__", "float32", "int32"}  # tensorrt_bindings/__init__.py, aliases
    for chain in sorted(chains):
        for part in chain.split("."):
            assert in_binding(binding, part) or part in python_layer, f"trt.{chain}: {part!r} is not in TensorRT 11.4"


def test_methods_called_exist_in_the_binding(binding: set[str]) -> None:
    sources = (TRT_DIR / "builder.py").read_text() + (TRT_DIR / "runner.py").read_text()
    for owner, names in OBJECT_API.items():
        for name in names:
            assert f".{name}" in sources, f"{owner}.{name} is no longer used: update OBJECT_API"
            assert in_binding(binding, name), f"{owner}.{name} is not in TensorRT 11.4"
    assert not in_binding(binding, "create_network_v2"), "the check must be able to fail"


@pytest.mark.parametrize("text", DOCUMENTED, ids=range(len(DOCUMENTED)))
def test_behaviour_relied_on_is_documented(binding: set[str], text: str) -> None:
    lines = [line.strip() for line in text.split("\n")]
    assert any(all(line in doc for line in lines) for doc in binding), text


def test_no_deprecated_flag_is_passed() -> None:
    assert "STRONGLY_TYPED" not in (TRT_DIR / "builder.py").read_text().replace("its STRONGLY_TYPED flag", "")


class ConfigStandIn:
    """IBuilderConfig's two timing-cache calls: a cache from another GPU is refused (returns False)."""

    def __init__(self, accepts: bool) -> None:
        self.accepts, self.attached = accepts, []

    def create_timing_cache(self, data: bytes) -> Any:
        return ("cache", data)

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False  # timings from another GPU would be wrong here
        ok = self.accepts or cache[1] == b""
        if ok:
            self.attached.append(cache[1])
        return ok


def test_timing_cache_of_another_gpu_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "model.cache"
    path.write_bytes(b"from another GPU")
    lines: list[str] = []
    config = ConfigStandIn(accepts=False)
    builder.attach_timing_cache(config, path, lines.append)
    assert config.attached == [b""] and "built on another GPU" in lines[0]
    config = ConfigStandIn(accepts=True)
    builder.attach_timing_cache(config, path, lines.append)
    assert config.attached == [b"from another GPU"] and len(lines) == 1
    builder.attach_timing_cache(config, None, lines.append)
    assert config.attached[-1] == b""


def test_runner_does_not_register_plugins() -> None:
    """An AOT plugin's kernel is in the engine: registering (and failing to) must not gate loading it."""
    assert "register_plugins" not in Path(runner.__file__).read_text()
    with pytest.raises(UserError, match="TensorRT is not installed"):
        runner.TensorRTRunner(b"not an engine")


def test_a_tensorrt_without_aot_plugins_is_one_line() -> None:
    """TensorRT's Python layer over a core without AOT plugin support (as before 10.12): one UserError."""
    plugins._register.cache_clear()
    try:
        with standin.python_layer(standin.python_layer_dir_or_skip(), aot=False):
            with pytest.raises(UserError, match="refused the tod::BinaryConv2d plugin: this TensorRT has no ahead"):
                plugins.register_plugins()
    finally:
        plugins._register.cache_clear()
