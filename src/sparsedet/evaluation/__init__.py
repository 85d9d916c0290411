"""COCO-style evaluation."""
from .coco import STAT_NAMES, EvaluationResult, evaluate_detections, to_coco_results

__all__ = ["STAT_NAMES", "EvaluationResult", "evaluate_detections", "to_coco_results"]
