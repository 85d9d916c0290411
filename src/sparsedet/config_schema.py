"""Every config key outside ``model:`` — the one place they are declared, typed and documented.

``model.*`` keys are declared by each model's config dataclass (``models/*/config.py``) and checked
by ``config.from_dict``; this module declares the rest: the top-level sections, ``solver``,
``input``, ``test``, ``data`` and the data-set sections (``data.train``, ``data.val``, ...).
``validate_config`` checks a resolved config against it when the config is read, so a typo
(``slover.base_lr``, ``solver.base_lrr``, ``input.min_size_trian``) or a wrong type or range
(``solver.max_iter=abc``, ``solver.base_lr=-1``) is an error that names the key, the value and
what is expected, with the closest valid keys, before any data are read or a model is built.

To add a key: add a ``Key`` to the section's table below (type, default, what it means); the code
that reads it should take its default from here (``defaults("solver")``).
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class Key:
    """One config key.

    Attributes:
        kind: expected value, one of ``int``, ``float`` (ints accepted), ``bool``, ``str``,
            ``ints`` (an int or a list of ints), ``list``, ``mapping``, ``path``, ``any``.
        default: the value used when the key is absent.
        doc: what the key does (shown nowhere but here: this is the documentation).
        nullable: ``null`` is allowed.
        check: extra condition on a non-null value, with ``expect`` describing it for the error.
        choices: the allowed values (for strings).
    """

    kind: str
    default: Any
    doc: str
    nullable: bool = False
    check: Optional[Callable[[Any], bool]] = None
    expect: str = ""
    choices: tuple = ()


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _probability(v) -> bool:
    return 0 <= v <= 1


SOLVER = {
    "optimizer": Key("str", "adamw", "adamw or sgd", choices=("adamw", "sgd")),
    "base_lr": Key("float", 2.5e-5, "learning rate of the non-backbone parameters", check=_positive, expect="> 0"),
    "backbone_lr_multiplier": Key("float", 1.0, "backbone lr = base_lr x this", check=_non_negative, expect=">= 0"),
    "weight_decay": Key("float", 1e-4, "weight decay of every tensor", check=_non_negative, expect=">= 0"),
    "norm_weight_decay": Key("float", None, "weight decay of normalisation/embedding tensors; null = weight_decay",
                             nullable=True, check=_non_negative, expect=">= 0"),
    "momentum": Key("float", 0.9, "SGD momentum", check=_probability, expect="in [0, 1]"),
    "sync_bn": Key("bool", False, "convert BatchNorm layers to SyncBatchNorm under torchrun on GPUs"),
    "param_groups": Key("list", [], "extra parameter groups: each {match: str, optimizer: adamw|sgd, lr: float, "
                                    "weight_decay: float (optional), clip_grad_norm: float (optional)}"),
    "images_per_batch": Key("int", 16, "images per optimizer step, over all processes and micro-batches",
                            check=_positive, expect=">= 1"),
    "accumulate_steps": Key("int", 1, "micro-batches per optimizer step", check=_positive, expect=">= 1"),
    "max_iter": Key("int", 1000, "optimizer steps in the run", check=_positive, expect=">= 1"),
    "steps": Key("list", [], "iterations at which the lr is multiplied by gamma"),
    "gamma": Key("float", 0.1, "lr decay factor at each of steps", check=_positive, expect="> 0"),
    "warmup_iters": Key("int", 0, "linear lr warm-up length", check=_non_negative, expect=">= 0"),
    "warmup_factor": Key("float", 0.001, "lr factor at iteration 0 of the warm-up", check=_non_negative,
                         expect=">= 0"),
    "amp": Key("bool", False, "mixed precision (float16 on CUDA, bfloat16 on CPU)"),
    "seed": Key("int", 0, "seed of initialisation, data order and augmentation"),
    "eval_period": Key("int", 0, "evaluate on data.val every N iterations (0: only at the end)",
                       check=_non_negative, expect=">= 0"),
    "checkpoint_period": Key("int", 0, "write last.pth every N iterations (0: only at the end)",
                             check=_non_negative, expect=">= 0"),
    "log_period": Key("int", 20, "write training metrics every N iterations", check=_positive, expect=">= 1"),
    "max_nonfinite_steps": Key("int", 5, "stop after this many NaN/inf steps in a row", check=_positive,
                               expect=">= 1"),
    "clip_grad_norm": Key("float", None, "full-model L2 gradient clipping (null: off)", nullable=True,
                          check=_positive, expect="> 0"),
    "clip_grad_value": Key("float", None, "per-element gradient clipping (null: off)", nullable=True,
                           check=_positive, expect="> 0"),
}

PARAM_GROUP = {
    "match": Key("str", None, "regular expression on parameter names"),
    "optimizer": Key("str", "adamw", "adamw or sgd", choices=("adamw", "sgd")),
    "lr": Key("float", None, "learning rate of the group", check=_positive, expect="> 0"),
    "weight_decay": Key("float", None, "weight decay of the group", nullable=True, check=_non_negative, expect=">= 0"),
    "clip_grad_norm": Key("float", None, "L2 clipping of the group's gradients", nullable=True, check=_positive,
                          expect="> 0"),
}

INPUT = {
    "min_size_train": Key("ints", [800], "training short side(s), one drawn per image", check=_positive,
                          expect="positive"),
    "max_size_train": Key("int", 1333, "training long-side cap", nullable=True, check=_positive, expect=">= 1"),
    "min_size_test": Key("ints", 800, "test short side", check=_positive, expect="positive"),
    "max_size_test": Key("int", 1333, "test long-side cap", nullable=True, check=_positive, expect=">= 1"),
    "horizontal_flip": Key("float", 0.5, "probability of a horizontal flip in training", check=_probability,
                           expect="in [0, 1]"),
    "crop": Key("mapping", {}, "random crop: {enabled, probability, first_resize: [..], size: [lo, hi]}"),
    "filter_empty_annotations": Key("bool", False, "drop training images without boxes"),
    "format": Key("str", "RGB", "channel order of the images fed to the model (always RGB; the model's "
                                "input_format converts for BGR weights)", choices=("RGB",)),
}

CROP = {
    "enabled": Key("bool", False, "use the crop branch"),
    "probability": Key("float", 0.5, "probability of the crop branch", check=_probability, expect="in [0, 1]"),
    "first_resize": Key("ints", None, "short sides of the resize before the crop", check=_positive,
                        expect="positive"),
    "size": Key("list", None, "[min, max] side of the crop"),
}

TEST = {
    "images_per_batch": Key("int", 1, "images per evaluation batch (per process)", check=_positive, expect=">= 1"),
    "metric": Key("str", "auto", "auto (the data set's own protocol), coco, crowdhuman or visdrone",
                  choices=("auto", "coco", "crowdhuman", "visdrone")),
    "visdrone_class_weighting": Key("str", "image_frequency", "VisDrone AP averaging over classes",
                                    choices=("image_frequency", "uniform")),
    "visdrone_max_dets": Key("int", 500, "VisDrone detections kept per image", check=_positive, expect=">= 1"),
}

DATA = {
    "root": Key("path", None, "folder relative data paths are resolved against (null: the current directory)",
                nullable=True),
    "train": Key("mapping", None, "the training set (see DATASET_FORMATS)", nullable=True),
    "val": Key("mapping", None, "the evaluation set", nullable=True),
    "test": Key("mapping", None, "another evaluation set (sparsedet eval --split test)", nullable=True),
    "num_workers": Key("int", None, "data loader worker processes; null or unset = min(4, available cores)",
                       nullable=True, check=_non_negative, expect=">= 0"),
    "aspect_ratio_grouping": Key("bool", True, "each batch all-landscape or all-portrait"),
    "class_names": Key("list", None, "written by the trainer: the training set's class names", nullable=True),
    "category_ids": Key("list", None, "written by the trainer: the training set's category ids", nullable=True),
}

# format -> (required keys, optional keys with defaults); every format also takes check_images.
DATASET_FORMATS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "coco": (("annotations", "images"), {}),
    "voc": (("images", "annotations"), {"split": None, "classes": None, "keep_difficult": False}),
    "yolo": (("images", "labels", "classes"), {}),
    "crowdhuman": (("annotations", "images"), {"box_kind": "full"}),
    "visdrone": (("images", "annotations"), {"split_quadrants": False, "others": "drop"}),
}
CHECK_IMAGES = ("none", "header", "full")

TOP_LEVEL = ("model", "input", "solver", "data", "test")

SECTIONS: dict[str, dict[str, Key]] = {"solver": SOLVER, "input": INPUT, "test": TEST, "data": DATA}


def defaults(section: str) -> dict[str, Any]:
    """The declared default of every key of ``section`` (``"solver"``, ``"input"``, ...)."""
    return {name: key.default for name, key in SECTIONS[section].items()}


def _unknown(name: str, where: str, valid) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" (did you mean {', '.join(f'{where}.{c}' if where else c for c in close)}?)" if close else ""
    return ConfigError(f"unknown config key {where + '.' if where else ''}{name}{hint}; valid keys: {', '.join(valid)}")


def _type_ok(kind: str, value) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int":
        return is_int
    if kind == "float":
        return (is_int or isinstance(value, float)) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "ints":
        items = value if isinstance(value, (list, tuple)) else [value]
        return bool(items) and all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    if kind == "list":
        return isinstance(value, (list, tuple))
    if kind == "mapping":
        return isinstance(value, Mapping)
    if kind == "path":
        return isinstance(value, os.PathLike) or (isinstance(value, str) and bool(value))
    return True


_KIND_TEXT = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
              "ints": "an integer or a list of integers", "list": "a list", "mapping": "a mapping",
              "path": "a path", "any": "a value"}


def check_value(key: Key, value, where: str) -> None:
    """Raises ``ConfigError`` naming ``where``, the value and what is expected."""
    if value is None:
        if key.nullable or key.default is None:
            return
        raise ConfigError(f"{where}: expected {_KIND_TEXT[key.kind]}, got null")
    expected = _KIND_TEXT[key.kind] + (" or null" if key.nullable else "")
    if not _type_ok(key.kind, value):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, key.choices))}, got {value!r}")
    if key.check is not None:
        items = value if key.kind == "ints" and isinstance(value, (list, tuple)) else [value]
        if not all(key.check(v) for v in items):
            raise ConfigError(f"{where}: expected {expected} {key.expect}, got {value!r}")


def _check_section(table: Mapping[str, Key], section, where: str) -> None:
    if section is None:
        return
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {section!r}")
    for name, value in section.items():
        if name not in table:
            raise _unknown(str(name), where, table)
        check_value(table[name], value, f"{where}.{name}")


def check_dataset_section(section, where: str) -> None:
    """Checks a data-set section (``data.train``): a known ``format`` and only its keys."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'format' key, got {section!r}")
    fmt = section.get("format")
    if fmt not in DATASET_FORMATS:
        raise ConfigError(f"{where}.format: expected one of {', '.join(DATASET_FORMATS)}, got {fmt!r}")
    required, optional = DATASET_FORMATS[fmt]
    allowed = {"format", "check_images", *required, *optional}
    for name in section:
        if name not in allowed:
            other = [f for f, (req, opt) in DATASET_FORMATS.items() if name in req or name in opt]
            hint = (f" ({name} belongs to format {' / '.join(other)}: when you switch {where}.format by an "
                    "override, sparsedet drops the base's keys of that set)") if other else ""
            err = _unknown(str(name), where, allowed)
            raise ConfigError(f"{err} for format {fmt}{hint}")
    check = section.get("check_images", "header")
    if check not in CHECK_IMAGES:
        raise ConfigError(f"{where}.check_images: expected one of {', '.join(CHECK_IMAGES)}, got {check!r}")


def validate_config(config: Mapping) -> None:
    """Checks every section but ``model`` (see the module docstring); ``model`` must be a mapping.

    Raises:
        ConfigError: naming the first bad key, its value and what is expected.
    """
    for name in config:
        if name not in TOP_LEVEL:
            raise _unknown(str(name), "", TOP_LEVEL)
    model = config.get("model")
    if model is not None and not isinstance(model, Mapping):
        raise ConfigError(f"model: expected a mapping of keys, got {model!r}")
    for name, table in SECTIONS.items():
        _check_section(table, config.get(name), name)
    solver = config.get("solver") or {}
    for i, group in enumerate(solver.get("param_groups") or []):
        _check_section(PARAM_GROUP, group, f"solver.param_groups[{i}]")
        for required in ("match", "lr"):
            if group.get(required) is None:
                raise ConfigError(f"solver.param_groups[{i}].{required}: missing")
    crop = (config.get("input") or {}).get("crop")
    _check_section(CROP, crop, "input.crop")
    data = config.get("data") or {}
    for split in ("train", "val", "test"):
        if data.get(split) is not None:
            check_dataset_section(data[split], f"data.{split}")
