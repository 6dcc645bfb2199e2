"""Precision passes on the ONNX side (TensorRT 11 is strongly typed: precision lives in the file).

* FP16: an autocast pass (onnxconverter-common) keeping post-processing, ``tod`` nodes and
  large-range tensors in FP32 (``fp16.py``);
* INT8: symmetric Q/DQ around Conv/MatMul/Gemm from CPU calibration with onnxruntime's quantizer
  (``int8.py``, ``calibration.py``), stem and last head layers kept in FP32 by default, real layers in
  front of 1-bit layers only where their rounding keeps those layers' input signs (``binary_inputs.py``);
* per-layer INT8 sensitivity (``sensitivity.py``); tables (``report.py``);
* ``pipeline.quantize_model``: the whole step, as ``tod-deploy quantize`` runs it.
"""

from __future__ import annotations

from tod_deploy.quant.pipeline import QuantizeResult, quantize_model

__all__ = ["QuantizeResult", "quantize_model"]
