"""sparsedet: sparse, query-based object detectors in one PyTorch codebase.

Python API::

    import sparsedet
    model = sparsedet.build_model("sparse_rcnn/r50_fpn_100pro_3x", ["model.num_proposals=300"])
    model = sparsedet.load("r50_100pro_3x_model.pth")        # ours, or official via the converter
    detections = sparsedet.predict(model, ["image.jpg"])       # resizes to the test scale
    sparsedet.convert_checkpoint("sparse_rcnn", "official.pth", "converted.pth")
    sparsedet.export_onnx(model.eval(), "model.onnx", dynamic=True)   # onnxruntime-ready

The public names are imported on first use (PEP 562 ``__getattr__``): ``import sparsedet`` and
the command line's ``--help`` do not pay for importing torch and every model.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "ConfigError": "config", "bundled_configs": "config", "load_config": "config",
    "convert_checkpoint": "convert",
    "load": "inference", "predict": "inference",
    "build_model": "models",
    "export_onnx": "export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:  # sparsedet.engine, sparsedet.data, ...: submodules, as a regular package import would give
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
