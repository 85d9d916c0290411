"""Restricted bipartite matching of TSP (tsp.md §0.3, §2.7 step 3, §3.7 step 3).

Each candidate may belong to exactly one GT (its FCOS-assigned GT in TSP-FCOS, its argmax-IoU GT in
TSP-RCNN), so the bipartite matching on the cost matrix with +inf outside each GT's candidates is a
per-GT argmin over that GT's own candidates: a GT with no candidate stays unmatched. The rows of
different GTs never compete for a column, so the result equals Hungarian matching on that matrix.
"""
from __future__ import annotations

import torch
from torch import Tensor

UNMATCHED_COST = 1e9


def restricted_match(cost: Tensor, gt_index: Tensor, num_gt: int) -> Tensor:
    """Per GT, the candidate of smallest cost among those assigned to it.

    Args:
        cost: (N,) matching cost of every candidate against its own GT (no gradient needed).
        gt_index: (N,) int64 GT of every candidate in [0, num_gt), or -1 for a candidate with no GT.
        num_gt: number of GTs.

    Returns:
        (num_gt,) int64 index of the matched candidate, -1 for a GT with no candidate. Ties go to the
        lowest candidate index (the official ``argmin`` over a filled [num_gt, N] matrix).
    """
    matched = torch.full((num_gt,), -1, dtype=torch.int64, device=cost.device)
    eligible = gt_index >= 0
    if num_gt == 0 or not bool(eligible.any()):
        return matched
    # The official [num_gt, N] matrix filled with 1e9 and cost_j at (gt_j, j), then row-wise argmin.
    table = cost.new_full((num_gt, cost.shape[0]), UNMATCHED_COST)
    columns = eligible.nonzero().squeeze(1)
    table[gt_index[columns], columns] = cost[columns].to(table.dtype)
    best_cost, best = table.min(dim=1)
    keep = best_cost < 0.9 * UNMATCHED_COST
    matched[keep] = best[keep]
    return matched
