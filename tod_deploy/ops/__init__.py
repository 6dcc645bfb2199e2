"""Custom operators of tod-deploy: ``tod::BinaryConv2d`` (reference, CPU kernel, ONNX export, onnxruntime)."""
