"""Tiny-object accuracy: COCO AP with the AI-TOD size bins, data-set readers, a synthetic data set.

``evaluate_detections`` and ``detections_as_ground_truth`` (coco_eval), ``load_image`` and
``read_image_set`` (datasets) are light; the model-running part (``run.evaluate_model``) and the
generator (``synthetic.generate_synthetic``) are imported from their modules.
"""

from tod_deploy.evaluation.coco_eval import AITOD_BINS, TABLE_METRICS, detections_as_ground_truth, evaluate_detections
from tod_deploy.evaluation.datasets import Letterbox, load_coco, load_image, read_image_set

__all__ = [
    "AITOD_BINS",
    "TABLE_METRICS",
    "Letterbox",
    "detections_as_ground_truth",
    "evaluate_detections",
    "load_coco",
    "load_image",
    "read_image_set",
]
