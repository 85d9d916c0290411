"""Evaluation protocols: COCO (faster-coco-eval), CrowdHuman (AP, mMR, recall, JI) and the
VisDrone-DET toolkit; all return an :class:`EvaluationResult`."""
from .coco import STAT_NAMES, EvaluationResult, evaluate_detections, to_coco_results
from .crowdhuman import evaluate_crowdhuman
from .visdrone import evaluate_visdrone

METRICS = ("auto", "coco", "crowdhuman", "visdrone")

__all__ = ["METRICS", "STAT_NAMES", "EvaluationResult", "evaluate_crowdhuman", "evaluate_detections",
           "evaluate_visdrone", "to_coco_results"]
