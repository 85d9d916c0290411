"""ONNX export: the whole detector (normalisation, padding, head, post-processing) in one graph.

The exported graph takes ``images`` (B, 3, H, W) float32 RGB 0-255 at network resolution (resizing
to the recipe's test scale stays outside, as for ``model(images)``) and returns fixed-size outputs:

    boxes            (B, K, 4) float32 xyxy in the input's pixels
    scores           (B, K)    float32, sorted as the model sorts them
    labels           (B, K)    int64, 0-based classes
    num_detections   (B,)      int64: rows ``[:num_detections[b]]`` are valid, the rest are zeros

with K = ``max_detections``. The graph is traced with ``torch.onnx.export(dynamo=False)`` (the
TorchScript exporter: it maps torchvision's ``nms`` / ``roi_align`` to ONNX ``NonMaxSuppression`` /
``RoiAlign``) and checked with ``onnx.checker``. Under tracing the image sizes are traced
values, so one graph serves every input size when ``dynamic=True``; the model code keeps them
traced (no ``int()`` / ``torch.tensor([...])`` of a size on the inference path).

Adding a model: a detector whose eval-mode ``forward(list_of_images)`` returns the usual list of
``{boxes, scores, labels}`` exports as it is. One whose inference path cannot be traced registers a
small adapter in ``EXPORT_ADAPTERS``: ``adapter(model, images) -> list of dicts``, run on a
``list`` of (3, H, W) tensors inside the traced graph (see ``_querydet_dense``).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .export_attention import traceable_attention

OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
# RoiAlign with aligned=True (half_pixel) needs opset 16; the TorchScript exporter stops at 20.
MIN_OPSET = 16
MAX_EXPORTER_OPSET = 20


# Newest ONNX opset each onnxruntime release runs (its release notes); later releases run 20+.
ORT_MAX_OPSET = {(1, 14): 18, (1, 15): 19, (1, 16): 19, (1, 17): 20}


def supported_opsets() -> range:
    """The opsets this exporter can write, the installed onnx can check and the installed
    onnxruntime can run."""
    high = MAX_EXPORTER_OPSET
    try:
        import onnx
        high = min(high, onnx.defs.onnx_opset_version())
    except ImportError:
        pass
    try:
        import onnxruntime
        version = tuple(int(v) for v in onnxruntime.__version__.split(".")[:2])
        if version < (1, 17):
            high = min(high, ORT_MAX_OPSET.get(version, 17))
    except (ImportError, ValueError):
        pass
    return range(MIN_OPSET, high + 1)


def default_opset() -> int:
    return supported_opsets()[-1]


def _default_adapter(model: nn.Module, images: list[Tensor]) -> list[dict]:
    return model(images)


@contextlib.contextmanager
def _csq_disabled(model: nn.Module):
    """QueryDet's Cascade Sparse Query off for the duration (restored after)."""
    csq = getattr(model.cfg, "csq", None)
    enabled = bool(getattr(csq, "enabled", False))
    if enabled:
        csq.enabled = False
    try:
        yield enabled
    finally:
        if enabled:
            csq.enabled = True


CSQ_NOT_EXPORTED = ("Cascade Sparse Query is not exported (its per-level, per-image gather counts are Python "
                    "loops over data-dependent sizes, which a trace freezes): the graph runs the dense heads")


def _querydet_dense(model: nn.Module, images: list[Tensor]) -> list[dict]:
    """QueryDet exports its dense path: Cascade Sparse Query's gather / scatter counts are
    data-dependent Python loops (per level, per image, ``if rows.numel()``) and its sparse
    convolution builds index tables in Python, which a trace would freeze to the export image."""
    with _csq_disabled(model):
        return model(images)


def _per_image(model: nn.Module, images: list[Tensor]) -> list[dict]:
    """One image per call: TSP-RCNN's proposals and ASAG's anchors are per-image sets of
    data-dependent size, which a batch pads with Python counts (frozen by a trace); one image
    needs no padding, and its set size stays a traced value."""
    return [model([image])[0] for image in images]


def _asag(model: nn.Module, images: list[Tensor]) -> list[dict]:
    """ASAG's default inference path, one image at a time. The ``fast_inference`` variant (early
    stop and per-image patch cap) is not made traceable."""
    if model.cfg.fast_inference:
        raise ValueError("ASAG with model.fast_inference=true is not exported: export with "
                         "model.fast_inference=false (the default inference path)")
    return _per_image(model, images)


# Detector class name -> adapter. Classes not listed use ``model(images)`` as it is.
EXPORT_ADAPTERS: dict[str, Callable[[nn.Module, list[Tensor]], list[dict]]] = {
    "QueryDet": _querydet_dense,
    "FCOS": _querydet_dense,
    "FasterRCNN": _querydet_dense,
    "TSPRCNN": _per_image,
    "ASAG": _asag,
}


class ExportableDetector(nn.Module):
    """Wraps an eval-mode detector for tracing: (B, 3, H, W) batch in, fixed-size outputs out."""

    def __init__(self, model: nn.Module, max_detections: int = 100):
        super().__init__()
        self.model = model
        self.max_detections = int(max_detections)
        self.adapter = EXPORT_ADAPTERS.get(type(model).__name__, _default_adapter)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """images (B, 3, H, W) RGB 0-255 -> boxes (B, K, 4), scores (B, K), labels (B, K), num (B,)."""
        detections = self.adapter(self.model, list(images.unbind(0)))
        return tuple(torch.stack(parts) for parts in zip(*(self.pad(d) for d in detections)))

    def pad(self, detections: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One image's variable-length detections -> the first K rows, zero-padded, and their count.
        Concatenating K zero rows and slicing keeps every shape static in the graph."""
        k = self.max_detections
        boxes, scores, labels = detections["boxes"], detections["scores"], detections["labels"].to(torch.int64)
        count = torch.clamp(torch.ones_like(scores, dtype=torch.int64).sum(), max=k)
        boxes = torch.cat((boxes, boxes.new_zeros((k, 4))))[:k]
        scores = torch.cat((scores, scores.new_zeros((k,))))[:k]
        labels = torch.cat((labels, labels.new_zeros((k,))))[:k]
        return boxes, scores, labels, count


def export_onnx(model: nn.Module, path: Union[str, Path], image_size: Sequence[int] = (800, 1216),
                dynamic: bool = False, batch_size: int = 1, max_detections: int = 100,
                opset: Optional[int] = None, check: bool = True) -> Path:
    """Exports an eval-mode detector to ONNX.

    Args:
        model: a sparsedet detector in eval mode (``model.eval()``), on the CPU.
        path: output ``.onnx`` file; its folder must exist.
        image_size: (H, W) of the traced input; with ``dynamic=False`` the only size the graph takes.
        dynamic: H and W become free dimensions (``height``, ``width``).
        batch_size: images per call (fixed in the graph).
        max_detections: K, the rows of every output.
        opset: ONNX opset (default: the newest in ``supported_opsets()``).
        check: run ``onnx.checker.check_model`` on the written file.

    Returns:
        The path written.

    Raises:
        ValueError: the model is in training mode, the opset is not supported, or ``dynamic`` is
            asked for a model with multi-scale deformable attention (ASAG-D: fixed size only).
        FileNotFoundError: the output folder does not exist.
    """
    if model.training:
        raise ValueError("export needs an eval-mode model: call model.eval() first "
                         "(a training-mode detector returns losses, not detections)")
    opsets = supported_opsets()
    opset = default_opset() if opset is None else int(opset)
    if opset not in opsets:
        raise ValueError(f"ONNX opset {opset} is not supported: choose {opsets[0]}..{opsets[-1]} "
                         f"(RoiAlign with half-pixel alignment needs {MIN_OPSET}; the exporter writes up to "
                         f"{MAX_EXPORTER_OPSET})")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist (for {path})")
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (H, W), got {tuple(image_size)}")
    if dynamic and any(type(m).__name__ == "MSDeformAttn" for m in model.modules()):
        raise ValueError("a model with multi-scale deformable attention (ASAG-D) exports at one fixed input "
                         "size: drop --dynamic and give --image-size H W (its level shapes are fixed when traced)")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"export runs on the CPU: move the model with model.cpu() (it is on {device})")

    wrapper = ExportableDetector(model, max_detections).eval()
    example = torch.rand(batch_size, 3, int(image_size[0]), int(image_size[1]), generator=torch.Generator().manual_seed(0)) * 255
    dynamic_axes = {"images": {2: "height", 3: "width"}} if dynamic else None
    with warnings.catch_warnings():
        # The tracer warns for every Python value it records (statistics, shape checks); the parity
        # tests, not these warnings, decide whether the graph is right.
        warnings.simplefilter("ignore")
        # No torch.no_grad() here: with gradients off nn.MultiheadAttention takes its fused fast
        # path (aten::_native_multi_head_attention), which has no ONNX mapping.
        # traceable_attention: attention over a data-dependent number of queries (TSP-RCNN
        # proposals, ASAG anchors) would otherwise keep the export-time count.
        with traceable_attention():
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
    model.eval()  # the exporter restores the wrapper's mode recursively; keep the caller's model in eval
    if check:
        import onnx
        onnx.checker.check_model(str(path))
    return path


def onnx_session(path: Union[str, Path], threads: Optional[int] = None):
    """An onnxruntime CPU ``InferenceSession`` for an exported file (``threads`` intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
