"""PyTorch -> ONNX: export, graph passes, parity verification, artifacts."""
