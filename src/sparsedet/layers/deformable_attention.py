"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in pure PyTorch.

Every query looks at ``n_points`` sampled locations per attention head and per feature level,
around a reference point (or box), and mixes what it samples with softmaxed weights:

    out[b, q, h] = sum_{l, p} A[b, q, h, l, p] * V_l[b, h](loc[b, q, h, l, p])

where ``V_l[b, h]`` is head h's slice of the projected value map of level l, read by bilinear
interpolation at a location given in [0, 1] map coordinates (``grid_sample`` at ``2 * loc - 1``,
``align_corners=False``: 0 and 1 are the outer edges of the border pixels; outside the map reads
zeros).

:func:`ms_deform_attn_core` is that sum alone, one function with the shapes of the official CUDA
kernel's entry point (``MSDeformAttnFunction``), so that a compiled kernel can replace it later.
:class:`MSDeformAttn` is the module with Deformable DETR's parameter names (``sampling_offsets``,
``attention_weights``, ``value_proj``, ``output_proj``) and initialisation; its official weights load
as they are.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ms_deform_attn_core", "MSDeformAttn", "check_spatial_shapes", "flatten_levels"]


def check_spatial_shapes(spatial_shapes: Tensor, level_start_index: Tensor, length: int) -> list[tuple[int, int]]:
    """Validates ``spatial_shapes`` (L, 2) (H, W) against ``level_start_index`` (L,) and the value
    length; returns the shapes as Python ints. Raises ``ValueError`` naming the argument."""
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (levels, 2) (H, W), got shape {tuple(spatial_shapes.shape)}")
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    if level_start_index.numel() != len(shapes) or level_start_index.tolist() != starts:
        raise ValueError(f"level_start_index must be {starts} for spatial_shapes {shapes}, "
                         f"got {level_start_index.tolist()}")
    total = sum(h * w for h, w in shapes)
    if total != length:
        raise ValueError(f"the value has {length} positions but spatial_shapes {shapes} add up to {total}")
    return shapes


def ms_deform_attn_core(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                        sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The sampling-and-weighting sum of multi-scale deformable attention.

    Args:
        value: (B, S, heads, d) projected values of all levels, flattened row-major per level and
            concatenated (S = sum of H_l * W_l).
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each level.
        level_start_index: (L,) int64 offset of each level in S (0, H_0 W_0, ...).
        sampling_locations: (B, Q, heads, L, P, 2) (x, y) in [0, 1] of each level's map
            (outside reads zeros).
        attention_weights: (B, Q, heads, L, P), already normalised (softmax over L * P).

    Returns:
        (B, Q, heads * d): head h fills channels h*d .. h*d + d - 1.

    Raises:
        ValueError: shapes that do not fit together (the message names the argument).
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, heads, d), got shape {tuple(value.shape)}")
    batch, length, heads, dim = value.shape
    shapes = check_spatial_shapes(spatial_shapes, level_start_index, length)
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (B, Q, heads, levels, points, 2), "
                         f"got shape {tuple(sampling_locations.shape)}")
    _, queries, loc_heads, levels, points, _ = sampling_locations.shape
    if (sampling_locations.shape[0], loc_heads, levels) != (batch, heads, len(shapes)):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match the value "
                         f"(batch {batch}, {heads} heads) and {len(shapes)} levels of spatial_shapes")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights must be {tuple(sampling_locations.shape[:-1])} "
                         f"(sampling_locations without the last dim), got {tuple(attention_weights.shape)}")
    # (B, Q, heads, L, P, 2) -> (B * heads, Q, L, P, 2) in grid_sample's [-1, 1] convention.
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)
    weights = attention_weights.transpose(1, 2).flatten(0, 1)                   # (B*heads, Q, L, P)
    output = value.new_zeros(batch * heads, dim, queries)
    for level, (h, w) in enumerate(shapes):
        start = int(level_start_index[level])
        # (B, H*W, heads, d) -> (B * heads, d, H, W): each head samples its own channel slice.
        level_value = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(batch * heads, dim, h, w)
        sampled = F.grid_sample(level_value, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)                            # (B*heads, d, Q, P)
        # Accumulate level by level: only one level's samples are alive at a time.
        output = output + (sampled * weights[:, None, :, level]).sum(-1)
    return output.view(batch, heads * dim, queries).transpose(1, 2)


def flatten_levels(maps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """[(B, C, H_l, W_l)] -> flattened (B, S, C), spatial_shapes (L, 2), level_start_index (L,)."""
    shapes = torch.tensor([m.shape[-2:] for m in maps], dtype=torch.long, device=maps[0].device)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1), shapes, starts


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR's ``MSDeformAttn``).

    Args:
        d_model: query / value width (256).
        n_levels: feature levels (4).
        n_heads: attention heads (8); must divide ``d_model``.
        n_points: sampling points per head and level (4).

    Sampling locations: for 2-d reference points (x, y) in [0, 1], ``loc = ref + offset / (W_l, H_l)``
    (offsets in cells of the level); for 4-d reference boxes (cx, cy, w, h),
    ``loc = (cx, cy) + offset / n_points * (w, h) * 0.5`` (two-stage Deformable DETR).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if value < 1:
                raise ValueError(f"MSDeformAttn: {name} must be >= 1, got {value}")
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of 8 directions per head, point p at
        distance p + 1 cells; uniform attention weights; xavier value / output projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling(self, query: Tensor, reference: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """Sampling locations (B, Q, heads, L, P, 2) and softmaxed weights (B, Q, heads, L, P) of
        ``query`` (B, Q, d) around ``reference`` (B, Q, L, 2 or 4)."""
        batch, queries, _ = query.shape
        if reference.dim() != 4 or reference.shape[:2] != (batch, queries) or reference.shape[-1] not in (2, 4):
            raise ValueError(f"reference must be (B, Q, levels, 2) points or (B, Q, levels, 4) boxes for a query "
                             f"of shape {tuple(query.shape)}, got {tuple(reference.shape)}")
        if reference.shape[2] != self.n_levels or spatial_shapes.shape[0] != self.n_levels:
            raise ValueError(f"MSDeformAttn was built for n_levels={self.n_levels} but got a reference over "
                             f"{reference.shape[2]} levels and spatial_shapes of {spatial_shapes.shape[0]} levels")
        shape = (batch, queries, self.n_heads, self.n_levels, self.n_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(batch, queries, self.n_heads, -1).softmax(-1).view(shape)
        if reference.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)                 # (L, 2) (W, H)
            locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            locations = (reference[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference[:, :, None, :, None, 2:] * 0.5)
        return locations, weights

    def forward(self, query: Tensor, reference: Tensor, value_input: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            query: (B, Q, d) queries (position embedding already added).
            reference: (B, Q, L, 2) points (x, y) or (B, Q, L, 4) boxes (cx, cy, w, h), in [0, 1]
                of each level's (padded) map.
            value_input: (B, S, d) flattened feature levels (see :func:`flatten_levels`).
            spatial_shapes: (L, 2) (H_l, W_l); level_start_index: (L,).
            padding_mask: optional (B, S) bool, True = padded position (its value reads as 0).

        Returns:
            (B, Q, d).
        """
        if value_input.dim() != 3 or value_input.shape[-1] != self.d_model:
            raise ValueError(f"value_input must be (B, S, {self.d_model}), got {tuple(value_input.shape)}")
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query must be (B, Q, {self.d_model}), got {tuple(query.shape)}")
        batch, length, _ = value_input.shape
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, length, self.n_heads, self.d_model // self.n_heads)
        locations, weights = self.sampling(query, reference, spatial_shapes)
        return self.output_proj(ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights))
