"""The config-driven training loop: one process or many (``torchrun``), CPU or GPU.

One iteration = one optimizer step over ``solver.images_per_batch`` images in total (all
processes, all accumulation micro-steps). What the loop does, in order, each iteration:
``accumulate_steps`` forward/backward passes under optional AMP, a NaN/inf guard that skips the
step (all processes together; a non-finite box or feature reaching RoIAlign counts as one) and
stops after ``solver.max_nonfinite_steps`` in a row, gradient clipping (per ``solver.param_groups``
entry, then ``clip_grad_norm`` full-model L2 or ``clip_grad_value``), the optimizer(s) and LR-schedule
steps (``engine/optim.py``), logging, and at the configured periods evaluation and checkpointing.

During a non-finite streak nothing is evaluated or saved, so ``last.pth`` always holds a state
whose last step was finite (the stop message names its iteration). Temporary files of a checkpoint
write that was killed are removed when the next run in the same folder starts.

Output folder: ``last.pth`` (resumable), ``best.pth`` (highest val AP), ``config.yaml`` (resolved),
``metrics.jsonl`` + ``tensorboard/``, ``train.log``, ``eval/`` results json per evaluation.

Exact resume: checkpoints hold the model, optimizer, schedule, AMP scaler, iteration and every
process's torch RNG state; the data order and each sample's augmentation are functions of
(seed, iteration), so ``--resume`` continues with exactly the batches and losses an uninterrupted
run would have seen.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import random
import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import load_model_weights, read_weights_file, remove_stale_temporaries, save_atomic
from ..config import ConfigError
from ..config_schema import defaults
from ..data import TrainingBatchSampler, TransformedDataset, build_transforms, collate, read_dataset, with_absolute_paths
from ..evaluation import EvaluationResult
from ..log import FILE_ONLY
from ..models import build_model
from ..models.backbones.build import backbone_keys_in_use
from ..models.build import model_config
from .distributed import DistributedContext, all_gather_objects, all_reduce_mean, any_process, init_distributed
from .evaluate import evaluate_model
from .metrics_log import MetricsLog
from .optim import ScheduleSet, build_optimizer

log = logging.getLogger("sparsedet.train")

# Every solver key and its default is declared in config_schema.SOLVER.
SOLVER_DEFAULTS = defaults("solver")


class Trainer:
    """Trains the detector a config describes on the config's ``data.train`` set.

    Args:
        config: a resolved config dict (``sparsedet.load_config``) with ``model``, ``input``,
            ``solver`` and ``data`` sections.
        output_dir: where checkpoints, logs and metrics go.
        resume: continue from ``output_dir/last.pth`` (``True``) or from a given checkpoint path.
        device: ``cpu``/``cuda``; default CUDA when available.
        progress: show a progress bar (main process only).
        model_builder: builds the detector from the resolved config (``model.num_classes`` already
            set from ``data.train``); default :func:`sparsedet.models.build_model`. For detectors
            outside the ``MODELS`` registry that follow its conventions (loss dict in training,
            ``{boxes, scores, labels}`` in original pixels in eval), e.g. the torchvision baselines
            of ``benchmarks/learning.py``.
    """

    def __init__(self, config: Mapping, output_dir: str | Path, resume: bool | str | Path = False,
                 device: Optional[str] = None, progress: bool = True,
                 model_builder: Optional[Callable[[dict], nn.Module]] = None):
        self.config = copy.deepcopy(dict(config))
        self.output_dir = Path(output_dir)
        self.ctx: DistributedContext = init_distributed(device)
        self.progress = progress and self.ctx.is_main
        self.solver = {**SOLVER_DEFAULTS, **(self.config.get("solver") or {})}
        self._check_solver()
        self._stop_requested = False
        self.stopped_early = False  # set when a stop request (Ctrl-C) ended train() before max_iter

        if model_builder is None:
            model_config(self.config)  # a typo in model.* fails now, not after reading the data
        self._make_portable()
        data_cfg = self.config.get("data") or {}
        if not data_cfg.get("train"):
            raise ConfigError("the config has no data.train section: say what to train on, e.g. "
                              "data.train={format: coco, annotations: train.json, images: train/}")
        self.train_set = read_dataset(data_cfg["train"], data_cfg.get("root"), "data.train")
        self.val_set = read_dataset(data_cfg["val"], data_cfg.get("root"), "data.val") if data_cfg.get("val") else None
        # The readers have logged their report (once per set); only the totals are repeated here.
        if self.ctx.is_main:
            log.info("data.train: %d images, %d classes", len(self.train_set.records), self.train_set.num_classes)
            if self.val_set is not None:
                log.info("data.val: %d images", len(self.val_set.records))
        if (self.config.get("input") or {}).get("filter_empty_annotations"):
            self.train_set = self.train_set.without_empty()
        if not self.train_set.records:
            raise ValueError(f"data.train ({self.train_set.source}) has no usable images")
        self._record_classes()

        torch.manual_seed(int(self.solver["seed"]))
        self.model = (model_builder or build_model)(self.config)
        if self.solver["sync_bn"] and self.ctx.enabled and self.ctx.device.type == "cuda":
            # Trainable BatchNorm (e.g. TSP's P6/P7 block) normalises over the global batch, as
            # detectron2's SyncBN; FrozenBatchNorm is not a BatchNorm and stays as it is.
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model = self.model.to(self.ctx.device)
        self.optimizer = build_optimizer(self.model, self.solver)
        self.scheduler = ScheduleSet(self.optimizer, self.solver)
        self.amp_dtype = torch.float16 if self.ctx.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(self.ctx.device.type,
                                           enabled=bool(self.solver["amp"]) and self.ctx.device.type == "cuda")
        self.iteration = 0
        self.best_ap = -math.inf
        self.saved_iteration: Optional[int] = None  # iteration held by last.pth (None: not written)
        resume_path = self._resume_path(resume)
        self._resumed = resume_path is not None
        if resume_path is not None:
            self._load_checkpoint(resume_path)
        # Per-process RNG (dropout etc.) differs by rank, like detectron2's seed + rank.
        if resume_path is None:
            torch.manual_seed(int(self.solver["seed"]) + self.ctx.rank)
        # Some parameters legitimately get no gradient in a step (e.g. an FPN level no RoI was
        # assigned to on small images), so DDP must look for unused ones.
        self.ddp_model = (DistributedDataParallel(self.model, device_ids=[self.ctx.device.index]
                                                  if self.ctx.device.type == "cuda" else None,
                                                  find_unused_parameters=True)
                          if self.ctx.enabled else self.model)
        self.metrics = MetricsLog(self.output_dir, enabled=self.ctx.is_main,
                                  resume_iteration=self.iteration if resume_path is not None else None)
        if self.ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temporaries(self.output_dir, ("last.pth", "best.pth")):
                log.info("removed %s, left by a checkpoint write that was interrupted", stale)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))

    # ------------------------------------------------------------------ set-up helpers
    def _check_solver(self) -> None:
        s = self.solver
        per_step = int(s["images_per_batch"])
        accumulate = int(s["accumulate_steps"])
        if accumulate < 1 or per_step % (accumulate * self.ctx.world_size):
            raise ConfigError(
                f"solver.images_per_batch ({per_step}) must be divisible by solver.accumulate_steps "
                f"({accumulate}) x the number of processes ({self.ctx.world_size})")
        if int(s["max_iter"]) < 1:
            raise ConfigError(f"solver.max_iter must be >= 1, got {s['max_iter']}")

    def _make_portable(self) -> None:
        """The config as the run saves it (``config.yaml``, checkpoints): data paths absolute, so
        ``sparsedet train OUTPUT/config.yaml --resume`` reads the same files from any folder, and
        only the ``model.backbone`` keys the chosen backbone reads. Builds the same model."""
        if isinstance(self.config.get("data"), dict):
            self.config["data"] = with_absolute_paths(self.config["data"])
        model_cfg = self.config.get("model")
        if isinstance(model_cfg, dict) and isinstance(model_cfg.get("backbone"), dict):
            backbone = backbone_keys_in_use(model_cfg["backbone"])
            weights = backbone.get("weights")
            if isinstance(weights, str) and weights != "imagenet" and Path(weights).expanduser().is_file():
                backbone["weights"] = os.path.abspath(Path(weights).expanduser())
            model_cfg["backbone"] = backbone

    def _record_classes(self) -> None:
        """The model predicts the training set's classes; their names travel in the saved config."""
        model_cfg = self.config.setdefault("model", {})
        configured = model_cfg.get("num_classes")
        if configured is not None and configured != self.train_set.num_classes and self.ctx.is_main:
            log.info("model.num_classes: %s in the config, %d in data.train: using %d",
                     configured, self.train_set.num_classes, self.train_set.num_classes)
        model_cfg["num_classes"] = self.train_set.num_classes
        data_cfg = self.config.setdefault("data", {})
        data_cfg["class_names"] = list(self.train_set.class_names)
        data_cfg["category_ids"] = [int(c) for c in self.train_set.category_ids]

    def _resume_path(self, resume) -> Optional[Path]:
        if not resume:
            return None
        path = self.output_dir / "last.pth" if resume is True else Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {path}")
        return path

    def _train_loader(self) -> DataLoader:
        s = self.solver
        micro_batch = int(s["images_per_batch"]) // int(s["accumulate_steps"])
        data_cfg = self.config.get("data") or {}
        sampler = TrainingBatchSampler(
            [r.width / r.height for r in self.train_set.records], micro_batch, seed=int(s["seed"]),
            rank=self.ctx.rank, world_size=self.ctx.world_size,
            group_by_aspect_ratio=bool(data_cfg.get("aspect_ratio_grouping", True)),
            start_iteration=self.iteration * int(s["accumulate_steps"]))
        workers = data_cfg.get("num_workers")
        workers = default_num_workers() if workers is None else int(workers)
        dataset = TransformedDataset(self.train_set, build_transforms(self.config.get("input") or {}, train=True))
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                          persistent_workers=workers > 0, pin_memory=self.ctx.device.type == "cuda")

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self) -> dict:
        rng_states = all_gather_objects(torch.get_rng_state())
        cuda_states = all_gather_objects(torch.cuda.get_rng_state() if self.ctx.device.type == "cuda" else None)
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "iteration": self.iteration, "best_ap": self.best_ap, "config": self.config,
            "rng": rng_states, "cuda_rng": cuda_states, "world_size": self.ctx.world_size,
        }

    def save_checkpoint(self, name: str = "last.pth") -> Optional[Path]:
        """Writes ``name`` atomically (temporary file, then rename). Collective: call on every process."""
        state = self._checkpoint_state()
        if name == "last.pth":
            self.saved_iteration = self.iteration
        if not self.ctx.is_main:
            return None
        return save_atomic(state, self.output_dir / name)

    def _load_checkpoint(self, path: Path) -> None:
        state = read_weights_file(path)
        missing = [k for k in ("model", "optimizer", "scheduler", "iteration") if k not in state]
        if missing:
            raise ValueError(f"{path}: not a sparsedet training checkpoint (no {missing}); "
                             "to start from weights only, set model.weights instead of --resume")
        saved_model = (state.get("config") or {}).get("model")
        if saved_model is not None and saved_model != self.config.get("model") and self.ctx.is_main:
            log.warning("%s was trained with another model section than the current config; "
                        "loading its weights into the current model", path)
        load_model_weights(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state.get("scaler") or {})
        self.iteration = int(state["iteration"])
        self.saved_iteration = self.iteration
        self.best_ap = float(state.get("best_ap", -math.inf))
        rng = state.get("rng") or []
        if len(rng) == self.ctx.world_size:
            torch.set_rng_state(rng[self.ctx.rank])
            cuda_rng = (state.get("cuda_rng") or [None] * len(rng))[self.ctx.rank]
            if cuda_rng is not None and self.ctx.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng)
        elif self.ctx.is_main:
            log.warning("%s was written by %d processes, this run has %d: data order is kept, "
                        "but random state is re-seeded", path, len(rng), self.ctx.world_size)
        if self.ctx.is_main:
            log.info("resumed from %s at iteration %d", path, self.iteration)

    # ------------------------------------------------------------------ the loop
    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.ctx.is_main:
            log.info("interrupt: finishing this step and saving last.pth (press Ctrl-C again to abort)")

    def train(self) -> Optional[EvaluationResult]:
        """Runs until ``solver.max_iter`` (or a stop request); returns the last evaluation (None
        without data.val or when none ran)."""
        s = self.solver
        max_iter, accumulate = int(s["max_iter"]), int(s["accumulate_steps"])
        previous_handler = signal.signal(signal.SIGINT, self._request_stop) if _in_main_thread() else None
        rng_state = torch.get_rng_state()
        batches = iter(self._train_loader()) if self.iteration < max_iter else iter(())
        if self._resumed:
            # Starting the loader draws a seed from the global RNG. An uninterrupted run made that
            # draw before its first step, so the restored state already includes it: undo it, or
            # every random draw in the model (dropout, TSP's FoI / RoI keep) is shifted by one.
            torch.set_rng_state(rng_state)
        bar = tqdm(total=max_iter, initial=self.iteration, desc="train", disable=not self.progress,
                   dynamic_ncols=True)
        nonfinite_in_a_row = 0
        result = None
        self.model.train()
        try:
            while self.iteration < max_iter:
                start = time.perf_counter()
                losses, finite = self._step(batches, accumulate)
                nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
                if not finite:
                    log.warning("iteration %d: non-finite loss%s, step skipped (%d in a row)", self.iteration,
                                f" {({k: round(v, 4) for k, v in losses.items()})}" if losses else "",
                                nonfinite_in_a_row)
                    if nonfinite_in_a_row >= int(s["max_nonfinite_steps"]):
                        raise FloatingPointError(
                            f"the loss was NaN/inf in {nonfinite_in_a_row} consecutive iterations (last at "
                            f"{self.iteration}): training diverged. Lower solver.base_lr (now {s.get('base_lr')}), "
                            f"set solver.clip_grad_norm, or disable solver.amp; {self._saved_state_text()} "
                            "(its weights may already be far off: resume from it only with those changes, or "
                            "start again).")
                self.iteration += 1
                step_time = time.perf_counter() - start
                if finite:
                    total = sum(losses.values())
                    bar.set_postfix(loss=f"{total:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                    if self.iteration % int(s["log_period"]) == 0 or self.iteration in (1, max_iter):
                        lr = self.scheduler.get_last_lr()[0]
                        self.metrics.write("train", self.iteration, {
                            "total_loss": total, "lr": lr, "time": step_time, **losses})
                        self._log_losses(total, losses, lr, step_time, max_iter)
                bar.update(1)
                at_end = self.iteration == max_iter
                # In a non-finite streak the weights are those that produced the NaN: neither
                # evaluate nor overwrite last.pth with them.
                in_streak = nonfinite_in_a_row > 0
                if in_streak and (self._due("eval_period") or self._due("checkpoint_period") or at_end):
                    log.warning("iteration %d: not evaluated or saved during a non-finite streak; %s",
                                self.iteration, self._saved_state_text())
                if not in_streak and (self._due("eval_period") or (at_end and self.val_set is not None)):
                    result = self.evaluate()
                if not in_streak and (self._due("checkpoint_period") or at_end):
                    self.save_checkpoint()
                if any_process(self._stop_requested, self.ctx.device):
                    self.stopped_early = True
                    if not in_streak:
                        self.save_checkpoint()
                    if self.ctx.is_main:
                        # The caller (CLI train, demo) prints how to continue: on the console once.
                        log.info("stopped at iteration %d; continue with --resume", self.iteration, extra=FILE_ONLY)
                    break
        except KeyboardInterrupt:
            if self.ctx.is_main:
                log.warning("aborted at iteration %d without saving; last.pth holds the last saved state",
                            self.iteration)
            raise
        finally:
            bar.close()
            self.metrics.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        return result

    def _log_losses(self, total: float, losses: Mapping[str, float], lr: float, step_time: float,
                    max_iter: int) -> None:
        """One line per log period in train.log; on the console only without a progress bar
        (the bar shows the loss and lr already)."""
        if not self.ctx.is_main:
            return
        parts = " ".join(f"{name} {value:.4f}" for name, value in losses.items())
        log.info("iteration %d/%d: total_loss %.4f (%s) lr %.3e, %.2f s/step", self.iteration, max_iter,
                 total, parts, lr, step_time, extra=FILE_ONLY if self.progress else None)

    def _saved_state_text(self) -> str:
        if self.saved_iteration is None:
            return "no last.pth was written in this run yet"
        return f"last.pth holds iteration {self.saved_iteration}, the last finite state saved"

    def _due(self, key: str) -> bool:
        period = int(self.solver.get(key) or 0)
        return period > 0 and self.iteration % period == 0

    def _step(self, batches, accumulate: int) -> tuple[dict[str, float], bool]:
        """One optimizer step over ``accumulate`` micro-batches. Returns the process-averaged losses
        and whether they were finite on every process (if not, the step is skipped everywhere)."""
        self.optimizer.zero_grad(set_to_none=True)
        summed: dict[str, float] = {}
        all_finite = True
        amp = bool(self.solver["amp"])
        for micro in range(accumulate):
            images, targets = next(batches)
            images = [img.to(self.ctx.device, non_blocking=True) for img in images]
            targets = [{k: (v.to(self.ctx.device) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
            # Gradients are synchronised across processes only on the last micro-batch.
            sync = (self.ddp_model.no_sync() if self.ctx.enabled and micro < accumulate - 1 else nullcontext())
            with sync:
                try:
                    with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=amp):
                        loss_dict = self.ddp_model(images, targets)
                    total = sum(loss_dict.values())
                    finite = bool(torch.isfinite(total).item())
                except FloatingPointError as err:  # e.g. the matcher refusing NaN boxes
                    log.warning("iteration %d: %s", self.iteration, err)
                    loss_dict, finite = {}, False
                finite = not any_process(not finite, self.ctx.device)
                all_finite &= finite
                if finite:
                    self.scaler.scale(total / accumulate).backward()
                else:
                    # A zero loss over every parameter keeps the processes' gradient reductions in
                    # step; the gradients are discarded below.
                    sum(p.sum() for p in self.model.parameters() if p.requires_grad).mul(0.0).backward()
            for key, value in loss_dict.items():
                summed[key] = summed.get(key, 0.0) + float(value.detach()) / accumulate
        if not all_finite:
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            return summed, False
        self.optimizer.unscale_(self.scaler)
        self.optimizer.clip_grad_norms()  # per-group clips of solver.param_groups
        if self.solver["clip_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.solver["clip_grad_norm"]))
        if self.solver["clip_grad_value"]:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), float(self.solver["clip_grad_value"]))
        self.optimizer.step(self.scaler)
        self.scaler.update()
        self.scheduler.step()
        return all_reduce_mean(summed, self.ctx.device), True

    def evaluate(self) -> Optional[EvaluationResult]:
        """Scores ``data.val`` with its own metrics (COCO, CrowdHuman or VisDrone: ``test.metric``);
        keeps ``best.pth`` by AP. Collective: call on every process."""
        if self.val_set is None:
            return None
        warmup_iters = int(self.solver.get("warmup_iters") or 0)
        if self.iteration < warmup_iters and self.ctx.is_main:
            log.warning("iteration %d: evaluating during the learning-rate warm-up (solver.warmup_iters=%d); "
                        "the AP of a model still warming up says little and may drop before it rises. "
                        "Set solver.eval_period above %d for meaningful figures.",
                        self.iteration, warmup_iters, warmup_iters)
        results_path = self.output_dir / "eval" / f"results_{self.iteration:07d}.json" if self.ctx.is_main else None
        result = evaluate_model(self.model, self.val_set, self.config, results_path=results_path,
                                progress=self.progress)
        self.model.train()
        self.metrics.write("eval", self.iteration, {k: v for k, v in result.stats.items()})
        if self.ctx.is_main:
            log.info("iteration %d: evaluation on data.val\n%s", self.iteration, result.table())
        if result.stats["AP"] > self.best_ap:
            self.best_ap = result.stats["AP"]
            self.save_checkpoint("best.pth")
        return result


def default_num_workers() -> int:
    """``data.num_workers`` when unset (or null): min(4, the CPU cores this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (for scripts and tests that build their own loops)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
