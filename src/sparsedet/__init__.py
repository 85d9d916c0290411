"""sparsedet: sparse, query-based object detectors in one PyTorch codebase.

Python API::

    import sparsedet
    model = sparsedet.build_model("sparse_rcnn/r50_fpn_100pro_3x", ["model.num_proposals=300"])
    model = sparsedet.load("r50_100pro_3x_model.pth")        # ours, or official via the converter
    detections = sparsedet.predict(model, ["image.jpg"])       # resizes to the test scale
    sparsedet.convert_checkpoint("sparse_rcnn", "official.pth", "converted.pth")
    sparsedet.export_onnx(model.eval(), "model.onnx", dynamic=True)   # onnxruntime-ready
"""
from .config import ConfigError, bundled_configs, load_config
from .convert import convert_checkpoint
from .export import export_onnx
from .inference import load, predict
from .models import build_model

__version__ = "0.1.0"
__all__ = ["ConfigError", "build_model", "bundled_configs", "convert_checkpoint", "export_onnx", "load", "load_config", "predict"]
