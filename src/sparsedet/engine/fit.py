"""A minimal full-batch training loop: the same few images every step.

Used by ``sparsedet demo`` and the overfit test to show that a detector learns. It applies the
recipe's optimizer, warmup + multi-step schedule and full-model gradient clipping.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .optim import ScheduleSet, build_optimizer


def fit_batch(model: nn.Module, images: Sequence[Tensor], targets: Sequence[dict], iterations: int,
              solver: Mapping, progress: bool = True,
              on_step: Optional[Callable[[int, dict], None]] = None) -> list[float]:
    """Trains ``model`` on one fixed batch for ``iterations`` steps.

    Args:
        solver: the config's ``solver`` section (``base_lr``, ``weight_decay``, ``clip_grad_norm``,
            ``warmup_iters``, ``steps`` ...).
        on_step: called with (iteration, float losses) after every step.

    Returns:
        The total loss of every step.

    Raises:
        FloatingPointError: the loss became NaN/inf.
    """
    model.train()
    optimizer = build_optimizer(model, solver)
    schedule = ScheduleSet(optimizer, solver)
    clip = solver.get("clip_grad_norm")
    history = []
    bar = tqdm(range(iterations), desc="train", disable=not progress, dynamic_ncols=True)
    for iteration in bar:
        losses = model(images, targets)
        total = sum(losses.values())
        if not math.isfinite(total.item()):
            raise FloatingPointError(f"loss is {total.item()} at iteration {iteration}: lower solver.base_lr")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.clip_grad_norms()  # per-group clips of solver.param_groups
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        optimizer.step()
        schedule.step()
        history.append(total.item())
        bar.set_postfix(loss=f"{total.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
        if on_step is not None:
            on_step(iteration, {k: v.item() for k, v in losses.items()})
    return history
