"""Optimizer and learning-rate schedule from a config's ``solver`` section."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def build_optimizer(model: nn.Module, solver: Mapping) -> torch.optim.Optimizer:
    """AdamW (or SGD) over the trainable parameters; backbone parameters get
    ``base_lr * backbone_lr_multiplier``. Weight decay applies to every tensor (official recipe)."""
    base_lr = float(solver.get("base_lr", 2.5e-5))
    multiplier = float(solver.get("backbone_lr_multiplier", 1.0))
    weight_decay = float(solver.get("weight_decay", 1e-4))
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(param)
    groups = [{"params": rest, "lr": base_lr}]
    if backbone:
        groups.append({"params": backbone, "lr": base_lr * multiplier})
    kind = solver.get("optimizer", "adamw")
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=base_lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=base_lr, momentum=float(solver.get("momentum", 0.9)), weight_decay=weight_decay)
    raise ValueError(f"solver.optimizer must be 'adamw' or 'sgd', got {kind!r}")


def warmup_multistep(solver: Mapping):
    """LR factor per iteration: linear warmup from ``warmup_factor`` over ``warmup_iters``, then
    x ``gamma`` at each of ``steps`` (detectron2's WarmupMultiStepLR)."""
    warmup_iters = int(solver.get("warmup_iters", 0))
    warmup_factor = float(solver.get("warmup_factor", 0.001))
    steps = sorted(int(s) for s in solver.get("steps", ()))
    gamma = float(solver.get("gamma", 0.1))

    def factor(iteration: int) -> float:
        decay = gamma ** sum(iteration >= s for s in steps)
        if iteration < warmup_iters:
            alpha = iteration / warmup_iters
            return decay * (warmup_factor * (1 - alpha) + alpha)
        return decay

    return factor
