"""Deployable layouts made from artifacts (an export, a quantized file, an engine) and their sidecars.

One module per target: ``triton`` writes a Triton Inference Server model repository
(``triton_python`` is the code Triton's Python backend runs, ``triton_server`` starts a server on
one). A new serving target is one module here; export, quantize and build-engine do not change.
"""
