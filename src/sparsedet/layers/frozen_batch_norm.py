"""FrozenBatchNorm2d that computes its per-channel scale and bias once instead of on every call.

torchvision's ``FrozenBatchNorm2d.forward`` rebuilds ``scale = weight * rsqrt(running_var + eps)``
and ``bias - running_mean * scale`` from its four buffers on every call: four reshapes and five
small element-wise ops before the two that touch the feature map. A MobileNetV2 body has 52 of
these layers, a ResNet-50 53, so one inference launches ~470-480 operators (GPU kernels) that
compute the same 2 x C numbers every time: a third of a whole QueryDet inference.

:class:`FrozenBatchNorm2d` keeps torchvision's class, buffers, state_dict and arithmetic (the same
ops in the same order, so the output is bitwise identical; the final add runs in place, sparing
a feature-map-sized temporary) and, in eval mode, remembers the last
``(scale, bias)`` pair. The cache is dropped whenever it could be stale:

* its key holds every buffer's identity, storage address, dtype, device and version counter, so
  ``load_state_dict`` (an in-place copy), in-place updates (optimizer steps of trainable affine
  parameters, ``torch.no_grad`` edits), ``.to()`` / ``.half()`` and re-assignment all miss it;
* ``train()`` / ``eval()``, ``load_state_dict`` and ``.to()`` also clear it explicitly (edits
  through ``.data`` do not bump a version counter; calling ``eval()`` afterwards is enough).

Training mode never caches (no change to training), nor does tracing, ONNX export or
``torch.compile`` (the graph keeps the buffers), nor a layer whose affine parameters require a
gradient while autograd records (``FrozenStatsBatchNorm2d``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

_BUFFERS = ("weight", "bias", "running_mean", "running_var")


class FrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """``torchvision.ops.FrozenBatchNorm2d`` with its eval-mode ``(scale, bias)`` cached.

    ``forward(x (N, C, H, W)) -> (N, C, H, W)``: ``x * scale + bias``, scale and bias (1, C, 1, 1).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        self._affine_cache: Optional[tuple[tuple, Tensor, Tensor]] = None

    def affine(self) -> tuple[Tensor, Tensor]:
        """(1, C, 1, 1) scale and bias, with torchvision's ops in torchvision's order."""
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return scale, bias

    def forward(self, x: Tensor) -> Tensor:
        scale, bias = self._cached_affine() if self._may_cache() else self.affine()
        # torchvision's ``x * scale + bias`` with the add in place: the same two passes and the
        # same rounding, one full-size temporary less (autograd needs neither result).
        return (x * scale).add_(bias)

    # ------------------------------------------------------------------ cache

    def _may_cache(self) -> bool:
        if self.training or torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        if torch.onnx.is_in_onnx_export():
            return False
        # Trainable affine parameters (FrozenStatsBatchNorm2d) under autograd: the graph needs them.
        return not (torch.is_grad_enabled() and (self.weight.requires_grad or self.bias.requires_grad))

    def _cache_key(self) -> Optional[tuple]:
        key = [self.eps]
        for name in _BUFFERS:
            tensor = getattr(self, name)
            if tensor.is_inference():   # no version counter to watch: never cache
                return None
            key += [id(tensor), tensor.data_ptr(), tensor.dtype, tensor.device, tensor._version]
        return tuple(key)

    def _cached_affine(self) -> tuple[Tensor, Tensor]:
        key = self._cache_key()
        if key is None:
            return self.affine()
        if self._affine_cache is None or self._affine_cache[0] != key:
            # Normal tensors even inside inference_mode, so that the cached pair can later be
            # saved for backward (eval-mode forward with a gradient to the input).
            with torch.inference_mode(False), torch.no_grad():
                scale, bias = self.affine()
            self._affine_cache = (key, scale, bias)
        return self._affine_cache[1], self._affine_cache[2]

    def clear_cache(self) -> None:
        self._affine_cache = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        # Pickling / deepcopy: the cache is derived data.
        state = self.__dict__.copy()
        state["_affine_cache"] = None
        return state
