"""Optimizers and learning-rate schedule from a config's ``solver`` section.

Parameters are split into groups by name (``solver.param_groups``), each group with its own
optimizer kind, learning rate, weight decay and optional gradient clip; parameters no rule
matches use ``solver.optimizer`` / ``solver.base_lr`` / ``solver.weight_decay`` (backbone ones
with ``backbone_lr_multiplier``). Norm-layer parameters (BN/GN/LN) can get their own weight decay
(``solver.norm_weight_decay``). Several optimizer kinds (TSP: SGD + AdamW for the transformer)
step together as one ``OptimizerSet``; one LR multiplier (warm-up + steps) scales every group
relative to its own base lr.

``solver`` keys read here:
    optimizer: ``adamw`` (default) or ``sgd`` for unmatched parameters.
    base_lr, weight_decay, momentum (SGD, 0.9), backbone_lr_multiplier (1.0).
    norm_weight_decay: float, or null (default) = ``weight_decay``, i.e. no special case.
    param_groups: list of ``{match: str, optimizer: adamw|sgd, lr: float, weight_decay: float
        (optional, default solver.weight_decay), clip_grad_norm: float (optional; global L2 norm
        over that group's parameters only)}``. The first rule whose ``match`` is a substring of a
        parameter's name takes it.
    warmup_iters, warmup_factor, steps, gamma: the schedule (``warmup_multistep``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..config import ConfigError

OPTIMIZER_KINDS = ("adamw", "sgd")
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)


@dataclass
class ParamGroupRule:
    """One entry of ``solver.param_groups`` (see the module docstring)."""

    match: str
    optimizer: str
    lr: float
    weight_decay: Optional[float] = None
    clip_grad_norm: Optional[float] = None


def parse_param_groups(solver: Mapping) -> list[ParamGroupRule]:
    """``solver.param_groups`` as rules. Raises ``ConfigError`` naming the bad entry."""
    raw = solver.get("param_groups") or []
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ConfigError(f"solver.param_groups must be a list of mappings, got {type(raw).__name__}")
    rules = []
    for i, entry in enumerate(raw):
        where = f"solver.param_groups[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping with match/optimizer/lr, got {entry!r}")
        unknown = set(entry) - {"match", "optimizer", "lr", "weight_decay", "clip_grad_norm"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; valid keys: match, optimizer, lr, "
                              "weight_decay, clip_grad_norm")
        for key in ("match", "optimizer", "lr"):
            if key not in entry:
                raise ConfigError(f"{where}.{key} is required")
        if entry["optimizer"] not in OPTIMIZER_KINDS:
            raise ConfigError(f"{where}.optimizer must be one of {list(OPTIMIZER_KINDS)}, got {entry['optimizer']!r}")
        if not isinstance(entry["match"], str) or not entry["match"]:
            raise ConfigError(f"{where}.match must be a non-empty string, got {entry['match']!r}")
        rules.append(ParamGroupRule(
            match=entry["match"], optimizer=entry["optimizer"], lr=float(entry["lr"]),
            weight_decay=None if entry.get("weight_decay") is None else float(entry["weight_decay"]),
            clip_grad_norm=None if entry.get("clip_grad_norm") is None else float(entry["clip_grad_norm"])))
    return rules


def norm_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters owned by normalisation layers (BN, SyncBN, GN, LN, FrozenBN)."""
    return {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}


class OptimizerSet:
    """One or more torch optimizers that act as one: ``zero_grad``, ``step``, ``state_dict``.

    Attributes:
        optimizers: the torch optimizers; ``optimizers[0]`` holds the unmatched (default) parameters.
        clip_groups: ``(parameters, max_norm)`` pairs clipped by ``clip_grad_norms`` (one global
            L2 norm per pair).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer],
                 clip_groups: Sequence[tuple[list[nn.Parameter], float]] = ()):
        self.optimizers = optimizers
        self.clip_groups = list(clip_groups)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        for opt in self.optimizers:
            scaler.unscale_(opt)

    def clip_grad_norms(self) -> None:
        """Clips each rule group with ``clip_grad_norm`` to that L2 norm (call after unscaling)."""
        for params, max_norm in self.clip_groups:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        for opt in self.optimizers:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: Mapping) -> None:
        """Also accepts a plain torch optimizer state (checkpoints written before OptimizerSet)."""
        states = state["optimizers"] if "optimizers" in state else [state]
        if len(states) != len(self.optimizers):
            raise ValueError(f"the checkpoint has {len(states)} optimizer(s), this config builds "
                             f"{len(self.optimizers)}: solver.param_groups differs from the saved run")
        for opt, opt_state in zip(self.optimizers, states):
            opt.load_state_dict(opt_state)


def _make_optimizer(kind: str, groups: list[dict], solver: Mapping) -> torch.optim.Optimizer:
    lr, weight_decay = groups[0]["lr"], groups[0]["weight_decay"]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(solver.get("momentum", 0.9)), weight_decay=weight_decay)
    raise ConfigError(f"solver.optimizer must be one of {list(OPTIMIZER_KINDS)}, got {kind!r}")


def build_optimizer(model: nn.Module, solver: Mapping) -> OptimizerSet:
    """The optimizer(s) over the trainable parameters of ``model`` (see the module docstring).

    Without ``param_groups`` and ``norm_weight_decay`` this is exactly the historical recipe: one
    optimizer with the groups [non-backbone, backbone (lr x backbone_lr_multiplier)] and one
    weight decay for every tensor.
    """
    base_lr = float(solver.get("base_lr", 2.5e-5))
    multiplier = float(solver.get("backbone_lr_multiplier", 1.0))
    weight_decay = float(solver.get("weight_decay", 1e-4))
    norm_wd = solver.get("norm_weight_decay")
    norm_wd = None if norm_wd is None else float(norm_wd)
    default_kind = solver.get("optimizer", "adamw")
    if default_kind not in OPTIMIZER_KINDS:
        raise ConfigError(f"solver.optimizer must be one of {list(OPTIMIZER_KINDS)}, got {default_kind!r}")
    rules = parse_param_groups(solver)
    norm_ids = norm_parameter_ids(model) if norm_wd is not None else set()

    # Bucket key: (rule index or -1 for default, is_backbone, is_norm); insertion order is kept so
    # the default optimizer's groups come out as [rest, rest-norm, backbone, backbone-norm].
    buckets: dict[tuple[int, bool, bool], list[nn.Parameter]] = {}
    for key in [(-1, False, False), (-1, False, True), (-1, True, False), (-1, True, True)]:
        buckets[key] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule_index = next((i for i, r in enumerate(rules) if r.match in name), -1)
        backbone = rule_index == -1 and name.startswith("backbone.")
        buckets.setdefault((rule_index, backbone, id(param) in norm_ids), []).append(param)

    per_kind: dict[str, list[dict]] = {default_kind: []}
    clip_params: dict[int, list[nn.Parameter]] = {}  # rule index -> every parameter it matched
    for (rule_index, backbone, is_norm), params in buckets.items():
        if not params and not (rule_index == -1 and not backbone and not is_norm):
            continue  # keep the (possibly empty) default group first, as before
        if rule_index == -1:
            kind, lr, wd = default_kind, base_lr * (multiplier if backbone else 1.0), weight_decay
        else:
            rule = rules[rule_index]
            kind, lr = rule.optimizer, rule.lr
            wd = weight_decay if rule.weight_decay is None else rule.weight_decay
            if rule.clip_grad_norm:
                clip_params.setdefault(rule_index, []).extend(params)
        if is_norm:
            wd = norm_wd
        per_kind.setdefault(kind, []).append({"params": params, "lr": lr, "weight_decay": wd})
    unused = [r.match for i, r in enumerate(rules) if not any(k[0] == i and v for k, v in buckets.items())]
    if unused:
        raise ConfigError(f"solver.param_groups: match {unused} names no trainable parameter of "
                          f"{type(model).__name__}")
    optimizers = [_make_optimizer(kind, groups, solver) for kind, groups in per_kind.items() if groups]
    # One global norm per rule, over its norm and non-norm buckets together (TSP spec section 4).
    clip_groups = [(params, rules[index].clip_grad_norm) for index, params in clip_params.items()]
    return OptimizerSet(optimizers, clip_groups)


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


class ScheduleSet:
    """One ``LambdaLR`` per optimizer of an ``OptimizerSet``, all with the same multiplier, so
    every parameter group follows ``base lr of the group x warmup_multistep(iteration)``."""

    def __init__(self, optimizers: OptimizerSet, solver: Mapping):
        factor = warmup_multistep(solver)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers.optimizers]

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def get_last_lr(self) -> list[float]:
        """Current lr of every group; ``[0]`` is the default group's."""
        return [lr for scheduler in self.schedulers for lr in scheduler.get_last_lr()]

    def state_dict(self) -> dict:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: Mapping) -> None:
        """Also accepts a single ``LambdaLR`` state (checkpoints written before ScheduleSet)."""
        states = state["schedulers"] if "schedulers" in state else [state]
        if len(states) != len(self.schedulers):
            raise ValueError(f"the checkpoint has {len(states)} schedule(s), this config builds {len(self.schedulers)}")
        for scheduler, s in zip(self.schedulers, states):
            scheduler.load_state_dict(s)
