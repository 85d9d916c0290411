"""COCO-style evaluation."""
from .coco import evaluate_detections, to_coco_results

__all__ = ["evaluate_detections", "to_coco_results"]
