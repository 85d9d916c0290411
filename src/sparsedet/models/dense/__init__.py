"""Parts shared by the anchor-based dense detectors (RetinaNet, QueryDet): IoU matcher, focal /
smooth-L1 losses with the EMA normaliser, the class / box head, per-level post-processing and the
``DenseDetector`` that assembles them."""
from .detector import DenseDetector
from .head import RetinaNetHead, flatten_level
from .iou_matcher import IoUMatcher
from .losses import ForegroundNormalizer, dense_detection_losses, query_loss
from .postprocess import LevelOutputs, level_candidates, merge_detections, postprocess_image

__all__ = ["DenseDetector", "ForegroundNormalizer", "IoUMatcher", "LevelOutputs", "RetinaNetHead",
           "dense_detection_losses", "flatten_level", "level_candidates", "merge_detections",
           "postprocess_image", "query_loss"]
