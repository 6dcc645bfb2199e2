"""Parity: does one runtime compute what another computes? One comparator for every check.

Export (onnxruntime against PyTorch), engines (TensorRT against onnxruntime) and quantized files
(FP16/INT8 against FP32) all run through :func:`comparator.compare`, in the spirit of Polygraphy's
Comparator: two runners in, one policy (tolerances, matching), one report out.

- ``policy.py``     the tolerances and matching rules, one preset per precision
- ``decisions.py``  hard decisions (thresholds, 1-bit input signs, top-k/NMS selections) and the one
                    rule they are judged by: a flip is excused only within tolerance of its boundary
- ``forcing.py``    teacher forcing: PyTorch takes the backend's input at every decision (needs torch)
- ``detections.py`` detection matching (IoU, label, score) with the selection rules of decisions.py
- ``comparator.py`` the seeded inputs, the element-wise comparison and the loop that joins them
- ``report.py``     what a comparison found, row by row, and the one line that says why it failed
"""
