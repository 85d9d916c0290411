"""Building a dataset from a config section such as ``data.train`` or ``data.val``.

Section formats (YAML)::

    # COCO instances json
    train:
      format: coco
      annotations: annotations/instances_train2017.json
      images: train2017

    # Pascal VOC xml (devkit layout shown; any images/annotations folder pair works)
    train:
      format: voc
      images: VOC2007/JPEGImages
      annotations: VOC2007/Annotations
      split: VOC2007/ImageSets/Main/trainval.txt   # null: every xml file
      classes: [aeroplane, bicycle, ...]            # null: the names found in the xml files, sorted
      keep_difficult: false                         # false: difficult objects are ignore regions

    # YOLO txt labels
    train:
      format: yolo
      images: images/train
      labels: labels/train
      classes: data.yaml                            # list, names file, or data.yaml with `names`

    # CrowdHuman .odgt (one JSON per line); scored with the CrowdHuman metrics (AP, mMR, recall, JI)
    val:
      format: crowdhuman
      annotations: CrowdHuman/annotation_val.odgt
      images: CrowdHuman/Images
      box_kind: full                                # full (fbox, default) | visible (vbox) | head (hbox)

    # VisDrone-DET txt (x,y,w,h,score,category,truncation,occlusion); scored with its toolkit's metrics
    train:
      format: visdrone
      images: VisDrone2019-DET-train/images
      annotations: VisDrone2019-DET-train/annotations
      split_quadrants: true                         # the official 4-quadrant training split (default false)
      others: background                            # class 11: background boxes (dense detectors) | drop (default)

Every format also takes ``check_images: none | header | full`` (default ``header``): "none" trusts
the annotations, "header" opens each image header (missing/unreadable files skipped, sizes and
EXIF orientation checked, a JPEG/PNG without its end marker decoded to find truncated files),
"full" decodes every image (also finds corrupt data inside a file; slow on big sets).

Relative paths are resolved against ``root`` (the config's ``data.root``; None = the current
directory).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..config_schema import DATASET_FORMATS
from .coco import read_coco
from .crowdhuman import BOX_KINDS, read_crowdhuman
from .records import DetectionDataset
from .validation import CHECK_MODES
from .visdrone import OTHERS_MODES, read_visdrone
from .voc import read_voc
from .yolo import load_class_names, read_yolo

# format -> (required keys, optional keys with defaults), declared with every other config key.
_KEYS = DATASET_FORMATS


def _resolve(value: Any, root: Optional[Path], key: str, must_be: str) -> Path:
    """A config path resolved against ``root``, checked to exist ("file" or "dir")."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"{key}: expected a path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    exists = path.is_file() if must_be == "file" else path.is_dir()
    if not exists:
        raise FileNotFoundError(f"{key}: {must_be} not found: {path.resolve()}")
    return path


def read_dataset(section: Mapping, root: Union[str, Path, None], name: str) -> DetectionDataset:
    """Reads the dataset a config section describes (formats in the module docstring).

    Args:
        section: the mapping, e.g. ``config["data"]["train"]``.
        root: folder relative paths are resolved against (None: the current directory).
        name: the section's config path, e.g. "data.train", used in error messages.

    Raises:
        ValueError: unknown format, missing or unknown keys (names ``name.key``).
        FileNotFoundError: a file or folder is missing (names ``name.key`` and the resolved path).
    """
    if not isinstance(section, Mapping):
        raise ValueError(f"{name}: expected a mapping with a 'format' key, got {section!r}")
    fmt = section.get("format")
    if fmt not in _KEYS:
        raise ValueError(f"{name}.format: expected one of {', '.join(_KEYS)}, got {fmt!r}")
    required, optional = _KEYS[fmt]
    allowed = {"format", "check_images", *required, *optional}
    for key in section:
        if key not in allowed:
            raise ValueError(f"{name}.{key}: unknown key for format {fmt} (expected {', '.join(sorted(allowed))})")
    for key in required:
        if section.get(key) is None:
            raise ValueError(f"{name}.{key}: missing (required for format {fmt})")
    options = dict(optional, **{k: v for k, v in section.items() if k in optional})
    check = section.get("check_images", "header")
    if check not in CHECK_MODES:
        raise ValueError(f"{name}.check_images: expected one of {', '.join(CHECK_MODES)}, got {check!r}")
    root = Path(root).expanduser() if root is not None else None

    def path(key: str, must_be: str) -> Path:
        return _resolve(section[key], root, f"{name}.{key}", must_be)

    if fmt == "coco":
        return read_coco(path("annotations", "file"), path("images", "dir"), check_images=check)
    if fmt == "crowdhuman":
        if options["box_kind"] not in (*BOX_KINDS, *BOX_KINDS.values()):
            raise ValueError(f"{name}.box_kind: expected one of {', '.join(BOX_KINDS)} "
                             f"(or {', '.join(BOX_KINDS.values())}), got {options['box_kind']!r}")
        return read_crowdhuman(path("annotations", "file"), path("images", "dir"), box_kind=options["box_kind"],
                               check_images=check)
    if fmt == "visdrone":
        if not isinstance(options["split_quadrants"], bool):
            raise ValueError(f"{name}.split_quadrants: expected true or false, got {options['split_quadrants']!r}")
        if options["others"] not in OTHERS_MODES:
            raise ValueError(f"{name}.others: expected one of {', '.join(OTHERS_MODES)}, got {options['others']!r}")
        return read_visdrone(path("images", "dir"), path("annotations", "dir"),
                             split_quadrants=options["split_quadrants"], others=options["others"],
                             check_images=check)
    if fmt == "voc":
        split = _resolve(options["split"], root, f"{name}.split", "file") if options["split"] is not None else None
        classes = options["classes"]
        if isinstance(classes, (str, Path)):
            classes = load_class_names(_resolve(classes, root, f"{name}.classes", "file"))
        elif classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{name}.classes: expected a list of names, a names file or null, got {classes!r}")
        if not isinstance(options["keep_difficult"], bool):
            raise ValueError(f"{name}.keep_difficult: expected true or false, got {options['keep_difficult']!r}")
        return read_voc(path("images", "dir"), path("annotations", "dir"), split=split, class_names=classes,
                        keep_difficult=options["keep_difficult"], check_images=check)
    classes = section["classes"]
    if isinstance(classes, (str, Path)):
        classes = _resolve(classes, root, f"{name}.classes", "file")
    elif not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{name}.classes: expected a list of names, a names file or a data.yaml, got {classes!r}")
    return read_yolo(path("images", "dir"), path("labels", "dir"), classes, check_images=check)


# format -> keys that hold paths (a VOC/YOLO ``classes`` key may also be a list of names)
_PATH_KEYS = {"coco": ("annotations", "images"), "voc": ("images", "annotations", "split", "classes"),
              "yolo": ("images", "labels", "classes")}


def with_absolute_paths(data: Mapping) -> dict:
    """A copy of a config's ``data`` section whose set paths are absolute, resolved as
    ``read_dataset`` would (against ``data.root``, else the current directory), and whose ``root``
    is absolute too. A run's saved ``config.yaml`` then reads the same files from any folder."""
    out = dict(data)
    root = data.get("root")
    base = Path(root).expanduser() if root is not None else Path.cwd()
    base = Path(os.path.abspath(base))  # absolute and normalised, symbolic links kept
    if root is not None:
        out["root"] = str(base)
    for name, section in data.items():
        if not isinstance(section, Mapping) or section.get("format") not in _PATH_KEYS:
            continue
        section = dict(section)
        for key in _PATH_KEYS[section["format"]]:
            value = section.get(key)
            if isinstance(value, (str, Path)) and str(value):
                path = Path(value).expanduser()
                section[key] = os.path.abspath(base / path)
        out[name] = section
    return out


def coco_image_ids(data: Mapping, paths: list[Path]) -> dict[Path, int]:
    """COCO image ids of the files in ``paths`` that belong to a COCO set of a config's ``data``
    section (a file under the set's ``images`` folder and listed in its json), keyed by the
    absolute path as given. A json is read only when some path lies under its images folder; a set
    that cannot be read is skipped (the ids are a convenience, not a requirement)."""
    import json

    wanted = {Path(os.path.abspath(p)): p for p in paths}
    ids: dict[Path, int] = {}
    for section in with_absolute_paths(data).values():
        if not isinstance(section, Mapping) or section.get("format") != "coco":
            continue
        images_dir = Path(section.get("images") or "")
        inside = [p for p in wanted if images_dir in p.parents]
        if not inside:
            continue
        try:
            images = json.loads(Path(section["annotations"]).read_text()).get("images", [])
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        by_path = {Path(os.path.abspath(images_dir / str(entry.get("file_name")))): entry.get("id")
                   for entry in images if isinstance(entry, dict)}
        for path in inside:
            if isinstance(by_path.get(path), int):
                ids.setdefault(wanted[path], by_path[path])
    return ids
