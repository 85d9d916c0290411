"""Small building blocks shared by ASAG's heads: activation by name, the MLP used as FFN, and the
``[Linear (no bias), LayerNorm, activation] x n`` class / box towers.

Attribute names (``layers``, tower indices 0, 1, 3, 4, ...) match the official state-dict keys.
"""
from __future__ import annotations

from torch import Tensor, nn

from ...layers.activation import build_activation

__all__ = ["build_activation", "MLP", "linear_tower", "run_tower"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with the activation between them (not after the last).

    (..., in_dim) -> (..., out_dim). Parameters: ``layers.{i}.weight / bias``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, activation: str = "gelu"):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activations = nn.ModuleList(build_activation(activation) for _ in range(num_layers - 1))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.activations):
                x = self.activations[i](x)
        return x


def linear_tower(num_layers: int, dim: int, activation: str = "gelu") -> nn.ModuleList:
    """``num_layers`` x [Linear(dim, dim, bias=False), LayerNorm(dim), activation] as one flat
    ModuleList (official indices: Linear at 3i, LayerNorm at 3i + 1)."""
    modules = []
    for _ in range(num_layers):
        modules += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), build_activation(activation)]
    return nn.ModuleList(modules)


def run_tower(tower: nn.ModuleList, x: Tensor) -> Tensor:
    """Applies the modules of a :func:`linear_tower` in order: (..., dim) -> (..., dim)."""
    for module in tower:
        x = module(x)
    return x
