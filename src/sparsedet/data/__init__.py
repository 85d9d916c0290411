"""Datasets, image loading and the transforms of the official recipes.

- ``records``: DetectionRecord, DetectionDataset, LoadReport (what every reader returns).
- ``coco`` / ``voc`` / ``yolo`` / ``crowdhuman`` / ``visdrone``: the readers; ``sources.read_dataset`` picks one from a config section.
- ``validation``: checks shared by the readers (image files, box sanity).
- ``image_io``: decoding files to (3, H, W) uint8 RGB with EXIF orientation applied.
- ``transforms``: training/test geometry (torchvision.transforms.v2).
- ``dataset`` / ``sampler``: torch Dataset with per-sample seeding, and the deterministic samplers.
"""
from .coco import read_coco
from .crowdhuman import read_crowdhuman
from .dataset import TransformedDataset, collate
from .image_io import ImageInfo, read_image, read_image_info
from .records import DetectionDataset, DetectionRecord, LoadReport
from .sampler import InferenceSampler, TrainingBatchSampler
from .sources import read_dataset, with_absolute_paths
from .transforms import build_transforms, resize_shortest_edge, shortest_edge_size
from .visdrone import read_visdrone
from .voc import read_voc
from .yolo import load_class_names, read_yolo

__all__ = [
    "DetectionDataset", "DetectionRecord", "ImageInfo", "InferenceSampler", "LoadReport", "TrainingBatchSampler",
    "TransformedDataset", "build_transforms", "collate", "load_class_names", "read_coco", "read_crowdhuman", "read_dataset",
    "read_image", "read_image_info", "read_visdrone", "read_voc", "read_yolo", "resize_shortest_edge", "shortest_edge_size",
    "with_absolute_paths",
]
