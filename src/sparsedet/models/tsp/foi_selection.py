"""Features-of-interest selection of TSP-FCOS (tsp.md §2.4)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...config import ConfigError


def foi_scores(logits: Tensor, positive: Optional[Tensor] = None) -> Tensor:
    """FoI score of every location: max_c sigmoid(logit), without gradient.

    Args:
        logits: (B, L, K) FoI-classifier logits of all locations.
        positive: (B, L) bool FCOS-positive locations (training); their score becomes (s + 1) / 2,
            which puts every positive above every negative.

    Returns:
        (B, L) scores.
    """
    with torch.no_grad():
        scores = logits.detach().float().sigmoid().max(dim=-1).values
        if positive is not None:
            scores = torch.where(positive, (scores + 1) / 2, scores)
    return scores


def select_top_fois(scores: Tensor, num_foi: int, clamp: bool = False) -> Tensor:
    """Per image, the indices of the ``num_foi`` best locations (B, num_foi), best first.

    Raises:
        ConfigError: fewer locations than ``num_foi`` and not ``clamp`` (names ``model.foi.num_foi``).
    """
    num_locations = scores.shape[1]
    if num_foi > num_locations:
        if not clamp:
            raise ConfigError(
                f"model.foi.num_foi={num_foi} is larger than the {num_locations} feature-map locations of "
                "this input: use larger images, a smaller model.foi.num_foi, or model.foi.clamp_to_locations=true")
        num_foi = num_locations
    return scores.topk(num_foi, dim=1).indices


def random_keep(num: int, keep_min: float, generator: Optional[torch.Generator] = None,
                device=None) -> Tensor:
    """The training-time random drop: keep K = int(num * f) of ``num`` slots, f = 1 - U[0, 1) * (1 -
    keep_min), i.e. f in (keep_min, 1]. Returns K distinct slot indices in random order; TSP-FCOS uses
    one draw for the whole batch."""
    fraction = 1.0 - torch.rand((), generator=generator).item() * (1.0 - keep_min)
    kept = max(int(num * fraction), 1)
    return torch.randperm(num, generator=generator)[:kept].to(device)
