"""YAML configs: bundled names, ``_base_`` inheritance, dotted overrides, typed sections.

A config is a nested dict read from YAML. A file may name a ``_base_`` file (relative to itself)
whose values it overrides key by key. Overrides are ``"a.b.c=value"`` strings whose value is
parsed as YAML (``model.num_proposals=300``, ``model.backbone.weights=null``).

Typed sections: ``from_dict(SomeDataclass, data, "model")`` builds a dataclass and rejects
unknown keys with the full dotted name and the closest valid key, and values of the wrong type.
Every other section is declared and checked in ``config_schema`` when the config is read.

Switching a data set's format by override (``data.train.format=yolo``) replaces that set's
section: the base's keys of the old format are dropped, the other overrides of the set apply.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .config_schema import validate_config
from .errors import ConfigError  # noqa: F401  (re-exported: sparsedet.config.ConfigError)

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot (``1e-4``, ``5E+3``) as floats;
    plain PyYAML (YAML 1.1) would return the string ``"1e-4"``."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def bundled_configs() -> list[str]:
    """Names of the configs shipped with sparsedet, e.g. ``sparse_rcnn/r50_fpn_100pro_3x``."""
    return sorted(str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.rglob("*.yaml"))


def config_description(name_or_path: str | Path) -> str:
    """The one-line description of a config: its file's first comment line (without ``#``), or
    ``""`` when the file does not start with a comment."""
    with resolve_config_path(name_or_path).open() as file:
        first = file.readline().strip()
    return first.lstrip("#").strip() if first.startswith("#") else ""


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or a bundled name with or without ``.yaml`` (``sparse_rcnn/r50_fpn_100pro_3x``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_ROOT / path, CONFIG_ROOT / path.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    close = difflib.get_close_matches(str(name_or_path), bundled_configs(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `sparsedet configs` to list them."
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a bundled config.{hint}")


def load_config(name_or_path: str | Path | Mapping, overrides: Iterable[str] | Mapping | None = None) -> dict:
    """Reads a config (path, bundled name or an already-loaded dict), applies overrides and checks
    every section outside ``model`` (``config_schema.validate_config``).

    Raises:
        ConfigError: the file, an override, or a key's name, type or range is invalid.
    """
    if isinstance(name_or_path, Mapping):
        config = copy.deepcopy(dict(name_or_path))
    else:
        config = _read_with_bases(resolve_config_path(name_or_path), seen=())
    if isinstance(overrides, Mapping):
        overrides = format_overrides(overrides)
    overrides = list(overrides or ())
    _reset_switched_formats(config, overrides)
    for item in overrides:
        apply_override(config, item)
    try:
        validate_config(config)
    except ConfigError as err:
        source = "" if isinstance(name_or_path, Mapping) else f"config {name_or_path}: "
        raise ConfigError(f"{source}{err}") from None
    return config


def _reset_switched_formats(config: dict, overrides: list[str]) -> None:
    """A ``section.format=X`` override that changes the format of an existing section empties
    that section first, so that the base's keys of the old format do not linger."""
    for item in overrides:
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if parts[-1] != "format" or len(parts) < 2:
            continue
        node = config
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and "format" in node:
            try:
                new = _yaml_load(raw)
            except yaml.YAMLError:
                continue  # apply_override reports it
            if new != node["format"]:
                node.clear()


def format_overrides(values: Mapping) -> list[str]:
    """``{"model.num_proposals": 300}`` -> ``["model.num_proposals=300"]`` (values as YAML)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in values.items()]


def _read_with_bases(path: Path, seen: tuple) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle through {[str(p) for p in seen]}")
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return merge(_read_with_bases((path.parent / base).resolve(), seen + (path,)), data)


def merge(base: dict, update: Mapping) -> dict:
    """Recursive dict update: mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(config: dict, item: str) -> None:
    """Applies one ``a.b.c=value`` override in place (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    node = config
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls, data: Mapping | None, prefix: str):
    """Builds dataclass ``cls`` from ``data``; nested dataclass fields recurse.

    Raises:
        ConfigError: unknown key (with the closest valid one) or a section that is not a mapping.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix}.{key}{hint}; valid keys: {', '.join(fields)}")
        hint_type = hints[key]
        _check_type(value, hint_type, f"{prefix}.{key}")
        if dataclasses.is_dataclass(hint_type):
            value = from_dict(hint_type, value, f"{prefix}.{key}")
        elif isinstance(value, list) and _is_tuple_hint(hint_type):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


_TYPE_TEXT = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_type(value, hint, where: str) -> None:
    """Raises ``ConfigError`` when a YAML value cannot be the dataclass field's type
    (``model.num_proposals=abc``); containers and unusual hints are checked loosely."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            _check_type(value, options[0], where)
        return
    if dataclasses.is_dataclass(hint) or value is None:
        return  # nested sections check themselves; None is allowed where the default is None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {int: is_int, float: is_int or isinstance(value, float), bool: isinstance(value, bool),
          str: isinstance(value, str)}.get(hint)
    if ok is None and (hint in (tuple, list) or origin in (tuple, list)):
        ok = isinstance(value, (list, tuple))
    if ok is False:
        kind = _TYPE_TEXT.get(hint, "a list")
        raise ConfigError(f"{where}: expected {kind}, got {value!r}")


def _is_tuple_hint(hint) -> bool:
    """``tuple``, ``tuple[int, ...]`` or ``Optional[tuple]`` (bare ``tuple`` has no origin)."""
    if hint is tuple or typing.get_origin(hint) is tuple:
        return True
    return typing.get_origin(hint) is typing.Union and any(_is_tuple_hint(a) for a in typing.get_args(hint))


def to_dict(obj) -> dict:
    """A dataclass config back to plain dicts and lists (to save next to a checkpoint)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
