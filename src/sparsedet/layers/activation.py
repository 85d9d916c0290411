"""Activation modules by config name."""
from __future__ import annotations

from torch import nn

__all__ = ["ACTIVATIONS", "build_activation"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def build_activation(name: str, key: str = "model.activation") -> nn.Module:
    """``relu`` / ``gelu`` (exact erf form) / ``silu`` -> a new module; ``key`` names the config
    key in the error message."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{key} must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()
