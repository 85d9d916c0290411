"""Submanifold sparse convolution in pure PyTorch, for running dense conv towers on a few sites.

Cascade Sparse Query (QueryDet, ``sparsedet.models.csq``) evaluates the detection heads of the
high-resolution FPN levels only around the positions a coarser level queried. This module holds the
machinery that makes that possible with the *dense* heads' own weights:

* :func:`query_children` maps query positions at level l+1 to their 2x2 children at level l.
* :func:`build_active_set` takes the union of context windows around the children (clipped to the
  map, de-duplicated per image, any batch size) and builds the neighbour table once.
* :func:`submanifold_conv` is one 3x3 (or 1x1) convolution restricted to the active set: sites
  outside it read as zero and get no output. One gather + one matmul per layer (chunked).
* :func:`sparse_tower` runs a whole :class:`~sparsedet.layers.conv_tower.ConvTower` that way:
  the trunk on the active sites (minus those no later layer reads, see :func:`needed_rows`), the
  predictors only on the requested rows (the children). :func:`sparse_towers` runs several towers
  on one active set, stacking same-shaped trunks into batched matmuls (fewer GPU kernel launches).
* :func:`masked_dense_tower` is the slow reference used by the tests: dense conv2d on a map that is
  zero outside the active set, re-masked after every layer.
* :func:`rulebook_conv` is the per-tap scatter-add formulation (what spconv's "native" algorithm
  does); same result, a cross-check for the gather path.
* An optional spconv 2.x backend (:class:`SpconvTower`) when ``spconv.pytorch`` is importable; it
  checks its weight layout against the pure path at first use and falls back to it when they
  disagree. spconv is not a dependency and this path is not exercised by the test suite's CI.

Conventions. A site is a (batch, y, x) triple of one level; active sets are stored as ``indices``
(N, 3) int64 rows in row-major order (batch, then y, then x). Features of the active set are a
(N, C) matrix whose row i belongs to ``indices[i]``. Convolutions follow PyTorch's cross-correlation
orientation (kernel tap (ky, kx) reads input (y + ky - 1, x + kx - 1)), stride 1, zero padding.
"""
from __future__ import annotations

import importlib.util
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "ActiveSet", "query_children", "build_active_set", "submanifold_conv", "rulebook_conv",
    "gather_sites", "needed_rows", "sparse_tower", "sparse_towers", "masked_dense_tower", "spconv_available", "SpconvTower",
]

# 3x3 taps in the order of the neighbour table's columns: ky-major, kx-minor (tap t = ky*3 + kx,
# offset (dy, dx) = (ky - 1, kx - 1)); the matmul weight is laid out the same way.
_TAPS = [(ky - 1, kx - 1) for ky in range(3) for kx in range(3)]
_CENTER_TAP = 4

# Child offsets (i, j) of a query at level l+1: child (2y + i, 2x + j). The official code emits
# the (0,0) children of all queries, then all (0,1), then (1,0), then (1,1); we keep that order.
_CHILD_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))

DEFAULT_CHUNK_ROWS = 2048


# --------------------------------------------------------------------------------------------
# active sets


@dataclass
class ActiveSet:
    """The sites a submanifold convolution is evaluated on, with their 3x3 neighbour table.

    Attributes:
        indices: (N, 3) int64 (batch, y, x) of every active site, row-major sorted and unique.
        neighbors: (N, 9) int64; column t = ky*3 + kx holds the row of site (y + ky - 1, x + kx - 1)
            of the same image, or the sentinel N (a zero row appended to the features) when that
            site is outside the map or not active.
        child_rows: (n,) int64 rows (into ``indices``) of the sites whose outputs are wanted, in the
            order they were given (the children of the queries); empty when none were given.
        shape: (B, H, W) of the level's map.
        radius: when known, every active site lies within this Chebyshev distance of a child inside
            a fully active window (``build_active_set``: context // 2); lets :func:`needed_rows`
            stop early. None for arbitrary masks.
    """

    indices: Tensor
    neighbors: Tensor
    child_rows: Tensor
    shape: tuple[int, int, int]
    radius: Optional[int] = None

    @property
    def num_active(self) -> int:
        return self.indices.shape[0]

    @property
    def num_positions(self) -> int:
        b, h, w = self.shape
        return b * h * w

    def mask(self) -> Tensor:
        """(B, H, W) bool map of the active sites."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.indices.device)
        out[self.indices[:, 0], self.indices[:, 1], self.indices[:, 2]] = True
        return out

    @classmethod
    def from_mask(cls, mask: Tensor, children: Optional[Tensor] = None) -> "ActiveSet":
        """Active set = the True sites of a (B, H, W) bool ``mask``; ``children`` (n, 3) must be
        active sites (their rows become ``child_rows``)."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a (B, H, W) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
        b, h, w = mask.shape
        lut_shape = (b, h + 2, w + 2)
        child_linear = None
        if children is not None and children.numel():
            _check_sites(children, "children")
            child_linear = _padded_linear(children, lut_shape, 1)
        return _from_indices(mask.nonzero(), (b, h, w), child_linear, 1, validate=True)


def query_children(parents: Tensor, shape: Sequence[int], parent_shape: Optional[Sequence[int]] = None) -> Tensor:
    """The 2x2 children at level l of query positions at level l+1.

    Args:
        parents: (n, 3) int64 (batch, y, x) at level l+1.
        shape: (B, H, W) of level l. Children outside it (possible only when level l is not exactly
            twice the size of level l+1, i.e. inputs not padded to the largest stride) are dropped.
        parent_shape: (B, H, W) of level l+1, optional: when level l is at least twice its size no
            child can fall outside, and the (device-synchronising) bounds filter is skipped.

    Returns:
        (m, 3) int64 (batch, 2y + i, 2x + j), m <= 4n, in the official order: child (0, 0) of every
        parent (in the parents' order), then every (0, 1), then (1, 0), then (1, 1). Children of
        different parents never coincide, so no de-duplication is needed.
    """
    _check_sites(parents, "parents")
    _, h, w = shape
    scale = _constant("child_scale", parents.device, lambda: [1, 2, 2])
    offsets = _constant("child_offsets", parents.device, lambda: [[[0, i, j]] for i, j in _CHILD_OFFSETS])
    children = torch.addcmul(offsets, parents.unsqueeze(0), scale).reshape(-1, 3)   # (4, n, 3) -> (4n, 3)
    if parent_shape is not None and 2 * parent_shape[-2] <= h and 2 * parent_shape[-1] <= w:
        return children
    inside = (children[:, 1] < h) & (children[:, 2] < w)
    return children if bool(inside.all()) else children[inside]


def build_active_set(children: Tensor, shape: Sequence[int], context: int = 5, validate: bool = True) -> ActiveSet:
    """Union of ``context`` x ``context`` windows around each child, clipped to the map.

    Args:
        children: (n, 3) int64 (batch, y, x) sites whose outputs are wanted (in the map, unique).
        shape: (B, H, W) of the level.
        context: odd window side (QueryDet: 5; 1 = the children only).
        validate: check that the children lie inside the map (costs a device synchronisation on
            GPUs; the cascade skips it because its children are in the map by construction).

    Returns:
        An :class:`ActiveSet` whose ``child_rows[k]`` is the row of ``children[k]``.

    De-duplication scatters the window sites into a boolean map padded by the window radius (so
    that no window needs clipping) and reads the map's interior back with ``nonzero``:
    O(n * context^2 + B*H*W) with small constants, no sort, one device synchronisation, and the result
    comes out row-major sorted (which keeps gathers from the feature map cache-friendly). Index
    constants (window offsets, strides, taps) are built once per device and map width.
    """
    _check_sites(children, "children")
    if context < 1 or context % 2 == 0:
        raise ValueError(f"context must be an odd window side >= 1, got {context}")
    b, h, w = (int(s) for s in shape)
    if validate and children.numel() and not bool(
            ((children >= 0).all(1) & (children[:, 0] < b) & (children[:, 1] < h) & (children[:, 2] < w)).all()):
        raise ValueError(f"some children lie outside the (B, H, W) = {(b, h, w)} map")
    r = context // 2
    pad = max(r, 1)   # the padded grid doubles as the neighbour lookup table, which needs 1
    grid_shape = (b, h + 2 * pad, w + 2 * pad)
    child_linear = _padded_linear(children, grid_shape, pad)
    # Windows around in-map children never leave the padded grid: no bounds tests, one scatter.
    window = _constant(("window", context, grid_shape[2]), children.device,
                       lambda: [dy * grid_shape[2] + dx for dy in range(-r, r + 1) for dx in range(-r, r + 1)])
    hit = torch.zeros(grid_shape, dtype=torch.bool, device=children.device)
    hit.view(-1).index_fill_(0, (child_linear.unsqueeze(1) + window).view(-1), True)
    # Read back the map's interior: (N, 3) (batch, y, x), row-major. The one synchronisation.
    indices = hit[:, pad:pad + h, pad:pad + w].nonzero()
    return _from_indices(indices, (b, h, w), child_linear, pad, validate=False, radius=r)


def _constant(key, device, make) -> Tensor:
    """A small int64 constant, built once per device (saves a host-to-device copy per call)."""
    full_key = (key, device)
    value = _CONSTANTS.get(full_key)
    if value is None:
        if len(_CONSTANTS) > 512:      # many distinct map sizes: start over rather than grow
            _CONSTANTS.clear()
        value = _CONSTANTS[full_key] = torch.tensor(make(), dtype=torch.long, device=device)
    return value


_CONSTANTS: dict = {}


def _padded_linear(sites: Tensor, grid_shape: tuple, pad: int) -> Tensor:
    """(n, 3) (batch, y, x) -> (n,) linear index into a (B, H + 2 pad, W + 2 pad) padded grid."""
    _, hp, wp = grid_shape
    strides = _constant(("strides", hp, wp), sites.device, lambda: [hp * wp, wp, 1])
    return (sites * strides).sum(1).add_(pad * wp + pad)


def _from_indices(indices: Tensor, shape: tuple, child_linear: Optional[Tensor], pad: int,
                  validate: bool = True, radius: Optional[int] = None) -> ActiveSet:
    """ActiveSet from row-major sorted unique (N, 3) sites; ``child_linear``: the children's indices
    into the (B, H + 2 pad, W + 2 pad) padded grid (or None)."""
    b, h, w = shape
    device = indices.device
    n = indices.shape[0]
    grid_shape = (b, h + 2 * pad, w + 2 * pad)
    wp = grid_shape[2]
    # Row lookup table on the padded grid, pre-filled with the sentinel n: a tap reading outside
    # the map lands in the border and needs no bounds test.
    base = _padded_linear(indices, grid_shape, pad)
    lut = torch.full((grid_shape[0] * grid_shape[1] * wp,), n, dtype=torch.long, device=device)
    lut.index_copy_(0, base, torch.arange(n, device=device))
    taps = _constant(("taps", wp), device, lambda: [dy * wp + dx for dy, dx in _TAPS])
    neighbors = lut[base.unsqueeze(1) + taps]
    if child_linear is None or child_linear.numel() == 0:
        child_rows = torch.zeros(0, dtype=torch.long, device=device)
    else:
        child_rows = lut[child_linear]
        if validate and bool((child_rows == n).any()):
            raise ValueError("some children are not active sites (or lie outside the map)")
    return ActiveSet(indices, neighbors, child_rows, (b, h, w), radius)


def _check_sites(sites: Tensor, name: str) -> None:
    if sites.dim() != 2 or sites.shape[1] != 3 or sites.dtype != torch.long:
        raise ValueError(f"{name} must be an (n, 3) int64 tensor of (batch, y, x), "
                         f"got {tuple(sites.shape)} {sites.dtype}")


def gather_sites(features: Tensor, indices: Tensor) -> Tensor:
    """(B, C, H, W) map, (N, 3) sites -> (N, C) feature rows."""
    return features.permute(0, 2, 3, 1)[indices.unbind(1)]


# --------------------------------------------------------------------------------------------
# convolution on an active set


def _check_conv(conv: nn.Module) -> int:
    """Kernel size of a conv the sparse path can reproduce exactly; raises otherwise."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"sparse towers need nn.Conv2d layers, got {type(conv).__name__}")
    k = conv.kernel_size
    if k not in ((1, 1), (3, 3)) or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 \
            or conv.padding != (k[0] // 2, k[1] // 2) or conv.padding_mode != "zeros":
        raise ValueError(f"submanifold conv supports 1x1/3x3, stride 1, 'same' zero padding, dilation 1, "
                         f"groups 1 only; got {conv}")
    return k[0]


# Matmul layouts of conv weights, cached per weight tensor: (version, device, dtype, inference) -> W.
# Re-laying out all weights of three towers costs ~35 MB of copies per level at 256 channels.
# Keyed by tensor identity (a plain WeakKeyDictionary would compare tensors with ==).
_WEIGHT_CACHE = WeakIdKeyDictionary()


def _matmul_weight(weight: Tensor) -> Tensor:
    """(C_out, C_in, k, k) -> (k*k*C_in, C_out), rows ordered (ky, kx, C_in) like the gathered taps."""
    grad = torch.is_grad_enabled() and weight.requires_grad
    if grad or weight.is_inference():
        # Training-time use keeps the graph; inference tensors (modules built under
        # inference_mode) have no version counter to tell when a cached copy went stale.
        return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])
    key = (weight._version, torch.is_inference_mode_enabled())
    hit = _WEIGHT_CACHE.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        w = weight.detach().permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()
    _WEIGHT_CACHE[weight] = (key, w)
    return w


def submanifold_conv(x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     rows: Optional[Tensor] = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """One submanifold convolution on an active set (gather + matmul).

    out(s) = bias + sum over taps (ky, kx) of W[:, :, ky, kx] @ x(y + ky - 1, x + kx - 1), where
    neighbours outside the active set (or the map) count as zero; outputs exist only on active sites.

    Args:
        x: (N, C_in) features of the active sites.
        neighbors: (N, 9) neighbour table of the active set (sentinel N = missing).
        weight: (C_out, C_in, k, k) dense conv weight, k in {1, 3}; bias: (C_out,) or None.
        rows: rows to evaluate (default all N); e.g. only the children for a predictor.
        chunk_rows: rows per gather/matmul, bounding the (rows, 9*C_in) gather buffer.

    Returns:
        (len(rows) or N, C_out).
    """
    n, c_in = x.shape
    k = weight.shape[-1]
    if x.is_cuda:
        # GPU memory is not the constraint at these sizes, kernel launches are: one chunk.
        chunk_rows = max(chunk_rows, 1 << 16)
    if weight.shape[1] != c_in:
        raise ValueError(f"weight expects {weight.shape[1]} input channels, features have {c_in}")
    w = _matmul_weight(weight)
    if k == 1:
        src = x if rows is None else x.index_select(0, rows)
        return torch.addmm(bias, src, w) if bias is not None else src @ w
    if k != 3:
        raise ValueError(f"kernel size {k} is not supported (1 or 3)")
    nbr = neighbors if rows is None else neighbors.index_select(0, rows)
    m = nbr.shape[0]
    # Sentinel row N reads as zero: out-of-set neighbours contribute nothing.
    xp = torch.cat([x, x.new_zeros(1, c_in)])
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if m <= chunk_rows or grad:
        g = xp.index_select(0, nbr.reshape(-1)).view(m, 9 * c_in)
        return torch.addmm(bias, g, w) if bias is not None else g @ w
    out = x.new_empty(m, w.shape[1])
    for start in range(0, m, chunk_rows):
        part = nbr[start:start + chunk_rows]
        g = xp.index_select(0, part.reshape(-1)).view(part.shape[0], 9 * c_in)
        if bias is not None:
            torch.addmm(bias, g, w, out=out[start:start + part.shape[0]])
        else:
            torch.mm(g, w, out=out[start:start + part.shape[0]])
    return out


def rulebook_conv(x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  rows: Optional[Tensor] = None) -> Tensor:
    """Same result as :func:`submanifold_conv`, computed tap by tap with a scatter-add.

    For each of the 9 taps: the (in_row, out_row) pairs where both sites are active, then
    ``out.index_add_(0, out_row, x[in_row] @ W[:, :, ky, kx].T)``. Uses less memory than the gather
    (no 9*C_in buffer) but 9 smaller matmuls; mainly a cross-check of the gather path.
    """
    n, c_in = x.shape
    k = weight.shape[-1]
    nbr = neighbors if rows is None else neighbors.index_select(0, rows)
    m = nbr.shape[0]
    out = x.new_zeros(m, weight.shape[0])
    taps = [(_CENTER_TAP, 0, 0)] if k == 1 else [(t, t // 3, t % 3) for t in range(9)]
    for t, ky, kx in taps:
        src = nbr[:, t]
        valid = (src < n).nonzero().squeeze(1)
        if valid.numel() == 0:
            continue
        out.index_add_(0, valid, x.index_select(0, src[valid]) @ weight[:, :, ky, kx].t())
    if bias is not None:
        out += bias
    return out


# --------------------------------------------------------------------------------------------
# whole towers


def sparse_tower(tower: nn.Module, x: Tensor, active: ActiveSet, rows: Optional[Tensor] = None,
                 impl: str = "gather", chunk_rows: int = DEFAULT_CHUNK_ROWS, prune: bool = True,
                 needed: Optional[list] = None) -> list[Tensor]:
    """Runs a :class:`ConvTower` (``.subnet`` 3x3 convs + ReLU, ``.predictors``) on an active set.

    Args:
        tower: any module with ``subnet`` and ``predictors`` lists of ``nn.Conv2d`` (its dense weights
            are used as they are).
        x: (N, C_in) input features of the active sites (e.g. :func:`gather_sites` of the FPN map).
        active: the active set (fixed for every layer: submanifold semantics).
        rows: rows at which the predictors are evaluated (default ``active.child_rows``); the trunk
            runs on every active row because the predictors read the children's neighbours.
        impl: ``gather`` (default, one matmul per layer) or ``rulebook`` (per-tap scatter-add).
        prune: skip trunk rows that no later layer reads (exact; see :func:`needed_rows`).
        needed: precomputed ``needed_rows(active, rows, tower)`` (towers of the same depth and
            predictor kernel share it; saves recomputing it per tower).

    Returns:
        One (len(rows), C_i) tensor per predictor.
    """
    if impl == "gather":
        def conv(inp, layer, r=None):
            return submanifold_conv(inp, active.neighbors, layer.weight, layer.bias, r, chunk_rows)
    elif impl == "rulebook":
        def conv(inp, layer, r=None):
            return rulebook_conv(inp, active.neighbors, layer.weight, layer.bias, r)
    else:
        raise ValueError(f"impl must be 'gather' or 'rulebook', got {impl!r}")
    if x.shape[0] != active.num_active:
        raise ValueError(f"features have {x.shape[0]} rows, the active set {active.num_active}")
    for layer in list(tower.subnet) + list(tower.predictors):
        _check_conv(layer)
    rows = active.child_rows if rows is None else rows
    if rows.numel() == 0:
        return [x.new_zeros(0, p.out_channels) for p in tower.predictors]
    if not prune:
        needed = [None] * len(tower.subnet)
    elif needed is None:
        needed = needed_rows(active, rows, tower)
    for layer, need in zip(tower.subnet, needed):
        if need is None:
            x = conv(x, layer).relu_()
        else:
            # Rows no later layer reads stay zero: they are never gathered (see needed_rows).
            y = x.new_zeros(x.shape[0], layer.out_channels)
            y[need] = conv(x, layer, need).relu_()
            x = y
    return [conv(x, p, rows) for p in tower.predictors]


def needed_rows(active: ActiveSet, rows: Tensor, tower: nn.Module) -> list[Optional[Tensor]]:
    """Per trunk layer, the active rows whose output a later layer actually reads (None = all).

    Working backwards from the predictor rows: a 3x3 layer needs its input on the active 3x3
    neighbours of the rows it computes, a 1x1 layer on the same rows. With QueryDet's 5x5 context
    (radius 2) and five 3x3 layers, only the last trunk layer shrinks (to the radius-1 ring around the
    children: 16 of 36 sites for an isolated query); with an exact 11x11 context every layer shrinks.
    Submanifold outputs at the skipped rows would never be read, so the result is unchanged.
    """
    n = active.num_active
    needed: list[Optional[Tensor]] = []
    need = rows
    kernels = [_check_conv(p) for p in tower.predictors]
    k_next = max(kernels)
    reach = 0      # Chebyshev distance from the children that the layers above read
    for layer in reversed(list(tower.subnet)):
        reach += k_next // 2
        if active.radius is not None and reach >= active.radius:
            # Every active site is within `radius` of a child through a fully active window, so
            # from here down every row is read (no need to compute it, nor to synchronise).
            needed.extend([None] * (len(tower.subnet) - len(needed)))
            break
        if k_next == 3:
            hit = torch.zeros(n + 1, dtype=torch.bool, device=rows.device)
            hit.index_fill_(0, active.neighbors.index_select(0, need).view(-1), True)
            need = hit[:n].nonzero().squeeze(1)
        else:
            need = need.unique()
        if need.numel() == n:   # every row is read from here on down: no pruning
            needed.extend([None] * (len(tower.subnet) - len(needed)))
            break
        needed.append(need)
        k_next = _check_conv(layer)
    return needed[::-1]


def sparse_towers(towers: Sequence[nn.Module], x: Tensor, active: ActiveSet, rows: Optional[Tensor] = None,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, prune: bool = True) -> list[list[Tensor]]:
    """Several towers on the same active set and input, e.g. QueryDet's class, box and query towers.

    Same result as ``[sparse_tower(t, x, active, rows) for t in towers]``, but towers whose trunks
    have the same shape run *stacked*: their first layers are one matmul against the concatenated
    weights (they read the same gathered input), and every later layer is one gather and one batched
    matmul for all of them. That divides the number of kernel launches by the number of towers,
    which is what bounds CSQ's speed on a GPU (a few thousand active rows are microseconds of math).
    Towers that share their trunk modules (views of one tower with different predictors, like the
    RPN's query and objectness/deltas views) run that trunk once.

    Returns:
        Per tower, one (len(rows), C_i) tensor per predictor.
    """
    rows = active.child_rows if rows is None else rows
    if x.shape[0] != active.num_active:
        raise ValueError(f"features have {x.shape[0]} rows, the active set {active.num_active}")
    groups: dict = {}
    for i, tower in enumerate(towers):
        kernels = [_check_conv(layer) for layer in list(tower.subnet) + list(tower.predictors)]
        signature = (tuple((c.in_channels, c.out_channels) for c in tower.subnet), max(kernels[len(tower.subnet):]))
        groups.setdefault(signature, []).append(i)
    out: list = [None] * len(towers)
    for (trunk, _), members in groups.items():
        group = [towers[i] for i in members]
        if rows.numel() == 0:
            for i in members:
                out[i] = [x.new_zeros(0, p.out_channels) for p in towers[i].predictors]
            continue
        needed = needed_rows(active, rows, group[0]) if prune else [None] * len(trunk)
        # One trunk per distinct set of trunk modules; member k reads trunk trunk_of[k].
        trunk_ids: dict = {}
        trunk_of = [trunk_ids.setdefault(tuple(map(id, tower.subnet)), len(trunk_ids)) for tower in group]
        distinct = [group[trunk_of.index(t)] for t in range(len(trunk_ids))]
        # The stacked path writes into preallocated buffers (inference); with autograd on, one by one.
        grad = torch.is_grad_enabled() and any(p.requires_grad for t in group for p in _tower_parameters(t))
        if len(group) == 1 or not trunk or grad:
            for i in members:
                out[i] = sparse_tower(towers[i], x, active, rows, chunk_rows=chunk_rows, prune=prune, needed=needed)
            continue
        feats, index = _stacked_trunk(distinct, x, active, needed, chunk_rows)   # (T N + 1, C), (T, N, 9)
        # Predictors: only at `rows`; one gather of the 3x3 neighbourhoods of every trunk.
        t_count, n = index.shape[:2]
        c = feats.shape[1]
        if any(p.kernel_size[0] == 3 for i in members for p in towers[i].predictors):
            gathered = feats.index_select(0, index.index_select(1, rows).reshape(-1))
            gathered = gathered.view(t_count, rows.shape[0], 9 * c)
        centres = index[:, :, _CENTER_TAP]                                 # (T, N) each row's own row
        for t, i in zip(trunk_of, members):
            out[i] = [_predict(feats, gathered[t] if p.kernel_size[0] == 3 else centres[t, rows], p)
                      for p in towers[i].predictors]
    return out


def _tower_parameters(tower) -> list[Tensor]:
    """Parameters of a tower's convs (also for tower views that are not ``nn.Module``s)."""
    return [p for conv in list(tower.subnet) + list(tower.predictors) for p in conv.parameters()]


def _predict(feats: Tensor, inputs: Tensor, conv: nn.Conv2d) -> Tensor:
    """A predictor at some rows: ``inputs`` = their (r, 9 C) gathered 3x3 neighbourhoods (3x3
    predictor), or their (r,) row numbers in the trunk output ``feats`` (1x1 predictor)."""
    w = _matmul_weight(conv.weight)
    g = feats.index_select(0, inputs) if conv.kernel_size[0] == 1 else inputs
    return torch.addmm(conv.bias, g, w) if conv.bias is not None else g @ w


# Stacked weights of groups of same-shaped convs: first weight -> {ids of all weights: (weak refs to
# them, versions, (W, b))}. Several groups can start with the same conv (QueryDet: class + box +
# query towers on P3, class + box on P2). Weak refs, so that a value never keeps its key alive.
_STACK_CACHE = WeakIdKeyDictionary()


def _stacked_weights(convs: Sequence[nn.Conv2d]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Of T same-shaped 3x3 convs: (T, 9*C_in, C_out) matmul weights, (T, 1, C_out) biases, and the
    same side by side, (9*C_in, T*C_out) and (T*C_out,), for towers that read one shared input."""
    weights = [c.weight for c in convs]
    cacheable = not any(w.is_inference() or (torch.is_grad_enabled() and w.requires_grad) for w in weights)
    if cacheable:
        versions = tuple(w._version for w in weights) + tuple(c.bias._version for c in convs)
        entries = _STACK_CACHE.get(weights[0])
        if entries is None:
            entries = _STACK_CACHE[weights[0]] = {}
        group_key = tuple(id(w) for w in weights)
        hit = entries.get(group_key)
        if hit is not None and all(r() is w for r, w in zip(hit[0], weights)) and hit[1] == versions:
            return hit[2]
    w = torch.stack([_matmul_weight(c.weight) for c in convs])
    b = torch.stack([c.bias for c in convs]).unsqueeze(1)
    t_count, _, c_out = w.shape
    w_cat = w.permute(1, 0, 2).reshape(w.shape[1], t_count * c_out)
    b_cat = b.reshape(t_count * c_out)
    if cacheable:
        entries[group_key] = (tuple(weakref.ref(x) for x in weights), versions, (w, b, w_cat, b_cat))
    return w, b, w_cat, b_cat


def _stacked_trunk(group: Sequence[nn.Module], x: Tensor, active: ActiveSet, needed: list,
                   chunk_rows: int) -> tuple[Tensor, Tensor]:
    """Trunks of T same-shaped towers on one active set.

    Returns:
        feats: (T * N + 1, C) trunk outputs, tower t's rows at t * N .. t * N + N - 1, and one
            shared zero row at the end (what a missing neighbour reads).
        index: (T, N, 9) rows of ``feats`` holding each tower's 3x3 neighbours of each active row
            (the neighbour table shifted by t * N, the sentinel mapped to the zero row).

    Rows no later layer reads (``needed``) are not computed; unlike :func:`sparse_tower` they are
    not zeroed either (they hold an earlier layer's values): nothing reads them. Two buffers of
    that layout alternate between layers, so that a layer is one gather, one batched matmul written
    in place and one ReLU.
    """
    t_count = len(group)
    n = x.shape[0]
    depth = len(group[0].subnet)
    if x.is_cuda:
        chunk_rows = max(chunk_rows, 1 << 16)
    chunk = max(chunk_rows // t_count, 256)
    offsets = torch.arange(0, t_count * n, n, device=x.device).view(t_count, 1, 1)
    nbr = active.neighbors
    index = torch.where(nbr == n, t_count * n, nbr + offsets)           # (T, N, 9), built once
    buffers = {}               # C_out -> two (buffer, body view) pairs that alternate
    feats = None               # the current layer's input buffer
    for layer_index in range(depth):
        convs = [tower.subnet[layer_index] for tower in group]
        w, b, w_cat, b_cat = _stacked_weights(convs)        # (T, 9 C_in, C_out), (T, 1, C_out), ...
        c_out = w.shape[2]
        need = needed[layer_index]
        if c_out not in buffers:
            both = x.new_empty(2, t_count * n + 1, c_out)
            both[:, -1].zero_()               # the zero rows (never written afterwards)
            buffers[c_out] = [(buf, buf[:-1].view(t_count, n, c_out)) for buf in both.unbind(0)]
        out, body = next(pair for pair in buffers[c_out] if pair[0] is not feats)
        m = n if need is None else need.shape[0]
        target = body if need is None else x.new_empty(t_count, m, c_out)
        if feats is None:
            # Layer 1: every tower reads the same x -> one gather, one matmul against [W_1 | ... | W_T].
            xp = F.pad(x, (0, 0, 0, 1))                                   # + the zero row
            layer_nbr = nbr if need is None else nbr.index_select(0, need)
            step = chunk * t_count
            for s in range(0, m, step):
                part = layer_nbr if m <= step else layer_nbr[s:s + step]
                g = xp.index_select(0, part.view(-1)).view(part.shape[0], -1)
                y = torch.addmm(b_cat, g, w_cat).view(-1, t_count, c_out).transpose(0, 1)
                if m <= step:
                    target.copy_(y)
                else:
                    target[:, s:s + part.shape[0]] = y
        else:
            layer_index_rows = index if need is None else index.index_select(1, need)   # (T, m, 9)
            if m <= chunk:
                g = feats.index_select(0, layer_index_rows.reshape(-1)).view(t_count, m, -1)
                torch.baddbmm(b, g, w, out=target)                           # one chunk: write in place
            else:
                for s in range(0, m, chunk):
                    part = layer_index_rows[:, s:s + chunk]
                    g = feats.index_select(0, part.reshape(-1)).view(t_count, part.shape[1], -1)
                    target[:, s:s + part.shape[1]] = torch.baddbmm(b, g, w)
        target.relu_()
        if need is not None:
            body.index_copy_(1, need, target)  # other rows keep stale values nobody reads
        feats = out
    return feats, index


def masked_dense_tower(tower: nn.Module, features: Tensor, mask: Tensor) -> list[Tensor]:
    """Slow reference of :func:`sparse_tower`: dense convs on a map zeroed outside ``mask``.

    Args:
        features: (B, C, H, W); mask: (B, H, W) bool active sites.

    Returns:
        One (B, C_i, H, W) map per predictor, zero outside the mask. After every layer the output is
        re-masked, which is exactly the submanifold semantics (inactive sites are zero at every
        layer, bias only on active sites).
    """
    m = mask.unsqueeze(1).to(features.dtype)
    x = features * m
    for conv in tower.subnet:
        x = conv(x).relu() * m
    return [p(x) * m for p in tower.predictors]


# --------------------------------------------------------------------------------------------
# optional spconv backend


def spconv_available() -> bool:
    """True when ``spconv.pytorch`` can be imported (it is an optional dependency)."""
    if importlib.util.find_spec("spconv") is None:
        return False
    try:
        import spconv.pytorch  # noqa: F401
    except Exception:  # broken CUDA build, ABI mismatch, ...: treat as absent
        return False
    return True


class SpconvTower:
    """A ConvTower evaluated with spconv ``SubMConv2d`` layers (optional backend).

    spconv versions disagree on the weight layout ((C_out, k, k, C_in) in >= 2.2; (k, k, C_in, C_out)
    in 1.x / 2.1 with SPCONV_FILTER_HWIO=1; (k, k, C_out, C_in) in 2.0/2.1 by default). At first use
    every layout that fits the layer's weight shape is tried on random data and compared with the
    pure-PyTorch path; the first that agrees (atol 1e-4 relative to the output scale) is kept. If none
    does, or spconv raises, a warning is issued and the pure path is used from then on (``.ok`` False).

    Call it like :func:`sparse_tower`: ``SpconvTower(tower)(x, active, rows)``. It is not required to
    be faster than the pure path; it exists for users whose GPU stack already has a tuned spconv.
    """

    _LAYOUTS = {
        "KRSC": (0, 2, 3, 1),   # (C_out, kh, kw, C_in)
        "RSCK": (2, 3, 1, 0),   # (kh, kw, C_in, C_out)
        "RSKC": (2, 3, 0, 1),   # (kh, kw, C_out, C_in)
    }

    def __init__(self, tower: nn.Module):
        self._tower = weakref.ref(tower)   # weak: instances are cached per tower (models.csq)
        self.layout: Optional[str] = None
        self.ok: Optional[bool] = None if spconv_available() else False

    @property
    def tower(self) -> nn.Module:
        tower = self._tower()
        if tower is None:
            raise RuntimeError("the tower of this SpconvTower no longer exists")
        return tower

    def _build(self, layout: str, device, dtype):
        import spconv.pytorch as spconv
        layers = []
        convs = list(self.tower.subnet) + list(self.tower.predictors)
        for conv in convs:
            k = _check_conv(conv)
            sub = spconv.SubMConv2d(conv.in_channels, conv.out_channels, k, stride=1, padding=k // 2,
                                    bias=conv.bias is not None, indice_key="csq")
            perm = self._LAYOUTS[layout]
            w = conv.weight.detach().permute(*perm).contiguous()   # spconv asserts contiguity (#56)
            if tuple(sub.weight.shape) != tuple(w.shape):
                raise ValueError(f"layout {layout} gives {tuple(w.shape)}, spconv wants {tuple(sub.weight.shape)}")
            sub.weight.data = w
            if conv.bias is not None:
                sub.bias.data = conv.bias.detach().clone()
            layers.append(sub.to(device=device, dtype=dtype))
        return layers

    def _run(self, layers, x: Tensor, active: ActiveSet, rows: Tensor) -> list[Tensor]:
        import spconv.pytorch as spconv
        b, h, w = active.shape
        st = spconv.SparseConvTensor(x, active.indices.int().contiguous(), [h, w], b)
        n_trunk = len(self.tower.subnet)
        for layer in layers[:n_trunk]:
            st = layer(st)
            st = st.replace_feature(torch.relu(st.features))    # spconv 2.x API (features are read-only)
        outs = []
        for layer in layers[n_trunk:]:
            # spconv keeps the input's row order for submanifold convs; read the requested rows.
            outs.append(layer(st).features.index_select(0, rows))
        return outs

    def _calibrate(self, x: Tensor, active: ActiveSet, rows: Tensor) -> None:
        reference = sparse_tower(self.tower, x, active, rows)
        for layout in self._LAYOUTS:
            try:
                layers = self._build(layout, x.device, x.dtype)
                got = self._run(layers, x, active, rows)
            except Exception:
                continue
            if all(torch.allclose(g, r, atol=1e-4 * max(1.0, float(r.abs().max())), rtol=1e-4)
                   for g, r in zip(got, reference)):
                self.layout, self.layers, self.ok = layout, layers, True
                return
        warnings.warn("spconv is installed but no weight layout reproduces the pure-PyTorch sparse "
                      "convolution; using the pure-PyTorch path", RuntimeWarning, stacklevel=3)
        self.ok = False

    def __call__(self, x: Tensor, active: ActiveSet, rows: Optional[Tensor] = None) -> list[Tensor]:
        rows = active.child_rows if rows is None else rows
        if self.ok is None and rows.numel() > 0:
            self._calibrate(x, active, rows)
        if not self.ok or rows.numel() == 0:
            return sparse_tower(self.tower, x, active, rows)
        return self._run(self.layers, x, active, rows)
