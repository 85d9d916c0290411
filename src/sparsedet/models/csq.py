"""Cascade Sparse Query (QueryDet, CVPR 2022): sparse evaluation of any FPN head's fine levels.

CSQ is an inference-time procedure. A query tower runs densely on a coarse *start level*
(QueryDet: P4); positions whose query probability exceeds sigma are *queries*. Each query points to
its 2x2 children on the next finer level; the detection towers (and, except at the last level, the
query tower) are evaluated there only on the children plus a small context window, with the dense
heads' weights; the children whose query probability again exceeds sigma become the queries for the
level below, and so on (P4 -> P3 -> P2). The submanifold convolution it relies on is in
:mod:`sparsedet.layers.sparse_conv`.

This module is generic: any head made of :class:`~sparsedet.layers.conv_tower.ConvTower`-like
towers (``.subnet`` 3x3 convs with ReLU, ``.predictors``) and any consecutive list of levels works
(RetinaNet cls + box towers, FCOS box tower with a centerness predictor, an RPN trunk with 1x1
predictors). Decoding the per-child outputs into boxes is the detector's job.

Query methods (paper tables 5 and 6), selected by ``method``:

* ``csq`` (default): submanifold sparse convolution on the union of ``context`` x ``context``
  windows around the children (``context=1``: children only, table 6 "1x1").
* ``crop`` (CQ): every child gets its own receptive-field crop (side 2R+1, R = number of 3x3
  layers of the tower), run through the convs without padding down to a 1x1 output. Implemented
  literally (gather the crops, ``conv2d(padding=0)``), so overlapping crops are recomputed: that is
  the point of the comparison. Exact: equals the dense head at the child. ``context`` is unused.
* ``complete_conv`` (CCQ): the towers run densely on the whole level, then are read at the children.
  Exact; costs as much as dense inference on those levels (plus the cascade).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..config import ConfigError
from ..layers.sparse_conv import (
    DEFAULT_CHUNK_ROWS, SpconvTower, build_active_set, gather_sites, query_children, sparse_towers,
)

__all__ = ["CSQ_METHODS", "CSQConfig", "CSQLevel", "CSQOutput", "anchor_level_outputs", "cascade_sparse_query",
           "crop_tower"]

CSQ_METHODS = ("csq", "crop", "complete_conv")
CSQ_BACKENDS = ("torch", "spconv")


@dataclass
class CSQConfig:
    """``model.csq``: Cascade Sparse Query at inference (training is always dense).

    Attributes:
        enabled: evaluate the levels below ``start_level`` sparsely in eval mode (false = dense).
        threshold: sigma; a position is a query when sigmoid(query logit) > sigma (strict). Official
            configs 0.12, paper text 0.15. Must lie in (0, 1).
        start_level: FPN level where the query head runs densely (QueryDet: 4 = P4). The sparse levels
            are the detection levels below it, finest last (P3, P2).
        context: odd side of the window evaluated around each child (official 5; 1 = children only;
            11 reproduces a 5-layer 3x3 tower exactly).
        method: ``csq`` (sparse convolution), ``crop`` (CQ) or ``complete_conv`` (CCQ); see the module
            docstring.
    """

    enabled: bool = False
    threshold: float = 0.12
    start_level: int = 4
    context: int = 5
    method: str = "csq"

    def __post_init__(self):
        def fail(name, message):
            raise ConfigError(f"model.csq.{name}: {message}, got {getattr(self, name)!r}")

        if not isinstance(self.enabled, bool):
            fail("enabled", "must be true or false")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 < float(self.threshold) < 1.0:
            fail("threshold", "must be a probability strictly between 0 and 1 (official 0.12)")
        self.threshold = float(self.threshold)
        if isinstance(self.start_level, bool) or not isinstance(self.start_level, int) or self.start_level < 1:
            fail("start_level", "must be an FPN level number >= 1 (QueryDet: 4)")
        if isinstance(self.context, bool) or not isinstance(self.context, int) \
                or self.context < 1 or self.context % 2 == 0:
            fail("context", "must be an odd window side >= 1 (official 5)")
        if self.method not in CSQ_METHODS:
            fail("method", f"must be one of {', '.join(CSQ_METHODS)}")

    def driver_kwargs(self) -> dict:
        """Keyword arguments of :func:`cascade_sparse_query` taken from this config."""
        return dict(start_level=self.start_level, threshold=self.threshold, context=self.context,
                    method=self.method)


@dataclass
class CSQLevel:
    """What the cascade computed on one sparse level.

    Attributes:
        level: FPN level number (e.g. 3 for P3).
        positions: (n, 3) int64 (batch, y, x) of the queried children, in the order of
            :func:`~sparsedet.layers.sparse_conv.query_children`.
        values: per value tower, one (n, C_i) tensor per predictor, row k at ``positions[k]``.
        query_logits: (n,) query logits at the children, or None at the last sparse level (no query
            head runs there).
        num_queries: number of queries (parents) on the level above that produced these children.
        num_active: sites at which the towers' first layer was evaluated (CSQ: the active set; CQ: the
            crops' sites, overlaps counted again; CCQ: the whole map).
        shape: (B, H, W) of the level.
    """

    level: int
    positions: Tensor
    values: list[list[Tensor]]
    query_logits: Optional[Tensor]
    num_queries: int
    num_active: int
    shape: tuple[int, int, int]

    @property
    def num_children(self) -> int:
        return self.positions.shape[0]

    @property
    def num_positions(self) -> int:
        b, h, w = self.shape
        return b * h * w

    def query_map(self) -> Optional[Tensor]:
        """(B, H, W) query logits scattered onto the level, -inf where not evaluated (None at the
        last level); for visualisation."""
        if self.query_logits is None:
            return None
        out = self.positions.new_full(self.shape, float("-inf"), dtype=self.query_logits.dtype)
        out[self.positions[:, 0], self.positions[:, 1], self.positions[:, 2]] = self.query_logits
        return out


@dataclass
class CSQOutput:
    """Result of :func:`cascade_sparse_query`.

    Attributes:
        start_level: the level with the dense query map.
        start_query_logits: (B, H, W) dense query logits at the start level.
        levels: the sparse levels the cascade reached, in cascade order (coarse to fine). A level with
            no queries (and every level after it) has no entry.
        sparse_levels, shapes: all sparse levels requested and their (B, H, W), reached or not.
        threshold, context, method: the settings used.
    """

    start_level: int
    start_query_logits: Tensor
    levels: list[CSQLevel]
    sparse_levels: list[int]
    shapes: dict[int, tuple[int, int, int]]
    threshold: float
    context: int
    method: str

    def level(self, number: int) -> Optional[CSQLevel]:
        """The entry of level ``number``, or None when the cascade did not reach it."""
        return next((lv for lv in self.levels if lv.level == number), None)

    def stats(self) -> dict:
        """Plain-number statistics: start queries, per sparse level the queries, children, active sites,
        positions and the evaluated share, and the share over all sparse levels together."""
        per_level, active, positions = {}, 0, 0
        for number in self.sparse_levels:
            b, h, w = self.shapes[number]
            lv = self.level(number)
            entry = dict(queries=lv.num_queries if lv else 0, children=lv.num_children if lv else 0,
                         active=lv.num_active if lv else 0, positions=b * h * w)
            entry["share"] = entry["active"] / max(entry["positions"], 1)
            per_level[number] = entry
            active += entry["active"]
            positions += entry["positions"]
        start_queries = int((self.start_query_logits.sigmoid() > self.threshold).sum())
        return dict(method=self.method, threshold=self.threshold, context=self.context,
                    start_level=self.start_level, start_queries=start_queries, levels=per_level,
                    share=active / max(positions, 1))


# spconv towers are built (and their weight layout calibrated) once per tower module.
_SPCONV_TOWERS = WeakIdKeyDictionary()


def cascade_sparse_query(
    features: Mapping[int, Tensor],
    query_tower: nn.Module,
    value_towers: Sequence[nn.Module],
    sparse_levels: Sequence[int],
    *,
    start_level: int = 4,
    threshold: float = 0.12,
    context: int = 5,
    method: str = "csq",
    start_query_logits: Optional[Tensor] = None,
    backend: str = "torch",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> CSQOutput:
    """Runs the query cascade from ``start_level`` down through ``sparse_levels``.

    Args:
        features: FPN maps ``{level: (B, C, H_l, W_l)}``; must contain the start and sparse levels.
            Level l-1 is (about) twice the size of level l (pad inputs to the largest stride).
        query_tower: tower with one 1-channel predictor (shared by the start and sparse levels).
        value_towers: towers whose predictors are wanted at the queried positions, e.g.
            ``[cls_tower, box_tower]``.
        sparse_levels: consecutive levels below the start, coarse to fine, e.g. ``[3, 2]``.
        start_level: level of the dense query map.
        threshold: sigma; queries are sigmoid(logit) > sigma (strict). Any value in [0, 1) is accepted
            here (0 queries everything; :class:`CSQConfig` restricts the config to (0, 1)).
        context: odd window side for ``method="csq"``.
        method: ``csq``, ``crop`` or ``complete_conv`` (module docstring).
        start_query_logits: (B, H, W) dense query logits at the start level when the caller already
            has them; otherwise the query tower runs here.
        backend: ``torch`` (default, pure PyTorch) or ``spconv`` (optional; self-checking, falls back to
            the pure path when spconv is absent or disagrees). Only used by ``method="csq"``.
        chunk_rows: rows per gather/matmul chunk of the sparse convolution.

    Returns:
        A :class:`CSQOutput`. Empty query sets stop the cascade: the level without queries and every
        level below it have no entry. Batches of any size: every position carries its batch index.
    """
    if method not in CSQ_METHODS:
        raise ValueError(f"method must be one of {CSQ_METHODS}, got {method!r}")
    if backend not in CSQ_BACKENDS:
        raise ValueError(f"backend must be one of {CSQ_BACKENDS}, got {backend!r}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    sparse_levels = [int(v) for v in sparse_levels]
    expected = list(range(start_level - 1, start_level - 1 - len(sparse_levels), -1))
    if sparse_levels != expected:
        raise ValueError(f"sparse levels must be the consecutive levels below the start level "
                         f"{start_level}, coarse to fine (e.g. {expected}); got {sparse_levels}")
    missing = [v for v in [start_level] + sparse_levels if v not in features]
    if missing:
        raise ValueError(f"features lack levels {missing} (have {sorted(features)})")
    if len(query_tower.predictors) != 1 or query_tower.predictors[0].out_channels != 1:
        raise ValueError("the query tower must have exactly one predictor with one output channel")

    # record_function ranges name the cascade's steps in torch.profiler traces (csq.P4, csq.P3, ...).
    with torch.profiler.record_function(f"csq.P{start_level}"):
        if start_query_logits is None:
            start_query_logits = query_tower(features[start_level])[0][:, 0]
        parents = (start_query_logits.sigmoid() > threshold).nonzero()
    parent_shape = tuple(start_query_logits.shape)

    shapes = {}
    for v in sparse_levels:
        f = features[v]
        shapes[v] = (f.shape[0], f.shape[2], f.shape[3])
    levels: list[CSQLevel] = []
    for i, v in enumerate(sparse_levels):
        if parents.shape[0] == 0:
            break
        with torch.profiler.record_function(f"csq.P{v}"):
            last = i == len(sparse_levels) - 1
            towers = list(value_towers) + ([] if last else [query_tower])
            children = query_children(parents, shapes[v], parent_shape)
            parent_shape = shapes[v]
            if method == "csq":
                outs, num_active = _evaluate_sparse(towers, features[v], children, context, backend, chunk_rows)
            elif method == "crop":
                outs = [crop_tower(t, features[v], children) for t in towers]
                # The first conv of a crop of side S computes (S - 2)^2 sites, per child.
                num_active = children.shape[0] * max((_crop_side(t) - 2) ** 2 for t in towers)
            else:  # complete_conv
                outs = [[o.permute(0, 2, 3, 1)[children[:, 0], children[:, 1], children[:, 2]] for o in t(features[v])]
                        for t in towers]
                num_active = shapes[v][0] * shapes[v][1] * shapes[v][2]
            query_logits = None if last else outs[-1][0][:, 0]
            levels.append(CSQLevel(level=v, positions=children, values=outs[:len(value_towers)],
                                   query_logits=query_logits, num_queries=parents.shape[0],
                                   num_active=num_active, shape=shapes[v]))
            if not last:
                parents = children[query_logits.sigmoid() > threshold]
    return CSQOutput(start_level=start_level, start_query_logits=start_query_logits, levels=levels,
                     sparse_levels=sparse_levels, shapes=shapes, threshold=threshold, context=context,
                     method=method)


def _evaluate_sparse(towers, feature: Tensor, children: Tensor, context: int, backend: str,
                     chunk_rows: int) -> tuple[list[list[Tensor]], int]:
    """CSQ proper: one active set (children + context windows) shared by all towers."""
    b, _, h, w = feature.shape
    active = build_active_set(children, (b, h, w), context, validate=False)  # in the map by construction
    x0 = gather_sites(feature, active.indices)
    if backend == "torch":
        # Same-shaped towers (QueryDet: class, box, query) run stacked: fewer, larger kernels.
        return sparse_towers(towers, x0, active, chunk_rows=chunk_rows), active.num_active
    outs = []
    for tower in towers:
        runner = _SPCONV_TOWERS.get(tower)
        if runner is None:
            runner = _SPCONV_TOWERS[tower] = SpconvTower(tower)
        outs.append(runner(x0, active))
    return outs, active.num_active


def _receptive_radius(tower: nn.Module) -> tuple[int, int]:
    """(trunk layers, largest predictor radius): the crop radius is their sum."""
    return len(tower.subnet), max(p.kernel_size[0] // 2 for p in tower.predictors)


def _crop_side(tower: nn.Module) -> int:
    trunk, pred = _receptive_radius(tower)
    return 2 * (trunk + pred) + 1


def crop_tower(tower: nn.Module, feature: Tensor, positions: Tensor, chunk: int = 256) -> list[Tensor]:
    """CQ: the tower's outputs at ``positions`` from per-position receptive-field crops.

    Args:
        tower: ConvTower-like (3x3 trunk convs, 3x3 or 1x1 predictors).
        feature: (B, C, H, W) level map.
        positions: (n, 3) int64 (batch, y, x).
        chunk: positions per batch of crops (bounds the (chunk, C, S, S) crop buffer).

    Returns:
        One (n, C_i) tensor per predictor, equal to the dense tower (zero padding at the map border)
        at those positions. Each crop of side S = 2R + 1 (R = trunk layers + predictor radius) is taken
        from the map with zeros outside it and shrinks by 2 per 3x3 conv (no padding) down to 1x1;
        crop sites outside the map are re-zeroed after every layer, as the dense zero padding does.
    """
    trunk_layers, pred_radius = _receptive_radius(tower)
    radius = trunk_layers + pred_radius
    side = 2 * radius + 1
    b, c, h, w = feature.shape
    n = positions.shape[0]
    if n == 0:
        return [feature.new_zeros(0, p.out_channels) for p in tower.predictors]
    d = torch.arange(-radius, radius + 1, device=feature.device)
    outs: list[list[Tensor]] = [[] for _ in tower.predictors]
    for start in range(0, n, chunk):
        pos = positions[start:start + chunk]
        ys = pos[:, 1, None, None] + d[:, None]              # (m, S, 1)
        xs = pos[:, 2, None, None] + d[None, :]              # (m, 1, S)
        inside = ((ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)).unsqueeze(1).to(feature.dtype)
        # Gather with clamped coordinates, then zero what lies outside the map (= zero padding).
        crop = feature[pos[:, 0, None, None], :, ys.clamp(0, h - 1), xs.clamp(0, w - 1)]  # (m, S, S, C)
        x = crop.permute(0, 3, 1, 2) * inside
        for depth, conv in enumerate(tower.subnet, start=1):
            x = F.conv2d(x, conv.weight, conv.bias).relu_()   # no padding: S shrinks by 2
            # The dense conv zero-pads every layer's input, so sites outside the map must stay zero
            # after each layer too (a crop of a pre-padded map would differ near the border).
            x = x * inside[:, :, depth:side - depth, depth:side - depth]
        for k, p in enumerate(tower.predictors):
            r = p.kernel_size[0] // 2
            off = pred_radius - r                              # centre crop for smaller predictors
            xin = x[:, :, off:x.shape[2] - off, off:x.shape[3] - off]
            outs[k].append(F.conv2d(xin, p.weight, p.bias).flatten(1))
    return [torch.cat(o) for o in outs]


def anchor_level_outputs(output: CSQOutput, anchor_generator, num_classes: int,
                         batch_size: int) -> list[list[tuple[Tensor, Tensor, Tensor]]]:
    """Per image, the reached sparse levels of an anchor-based head as post-processing rows.

    Assumes ``value_towers = [cls_tower, box_tower]`` with one predictor each, channel layouts
    ``a * K + k`` and ``a * 4 + d`` (detectron2), so a child's (A*K,) row views as (A, K).

    Args:
        output: :func:`cascade_sparse_query` result.
        anchor_generator: has ``anchors_at(level, ys, xs) -> (n * A, 4)`` (position-major).
        num_classes: K.
        batch_size: B (images without any child on a level get no entry for it).

    Returns:
        Per image, per reached level in cascade order: ``(logits (n_i * A, K), deltas (n_i * A, 4),
        anchors (n_i * A, 4))`` with rows child-major, anchor-minor (spec section 3.5).
    """
    per_image: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(batch_size)]
    for lv in output.levels:
        cls, box = lv.values[0][0], lv.values[1][0]
        logits = cls.reshape(-1, num_classes)                       # (n * A, K)
        deltas = box.reshape(-1, 4)                                 # (n * A, 4)
        num_anchors = logits.shape[0] // max(lv.num_children, 1)
        anchors = anchor_generator.anchors_at(lv.level, lv.positions[:, 1], lv.positions[:, 2])
        if batch_size == 1:   # every row is image 0's: no per-image split (and no GPU sync)
            per_image[0].append((logits, deltas, anchors))
            continue
        image_of_row = lv.positions[:, 0].repeat_interleave(num_anchors)
        for b in range(batch_size):
            rows = (image_of_row == b).nonzero().squeeze(1)
            if rows.numel():
                per_image[b].append((logits[rows], deltas[rows], anchors[rows]))
    return per_image
