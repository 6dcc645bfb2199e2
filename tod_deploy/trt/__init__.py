"""TensorRT 11 (imported lazily: the package works without it)."""
