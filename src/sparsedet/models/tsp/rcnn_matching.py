"""TSP-RCNN's matching of proposals to GT boxes (spec §3.7 step 3, §3.10).

The official matching is not Hungarian: each eligible proposal can only belong to its argmax-IoU GT,
so the restricted bipartite matching reduces to a per-GT argmin over that GT's candidates (equal to
``scipy.optimize.linear_sum_assignment`` on the cost matrix with +inf outside each GT's candidates).
The DETR-loss baseline matches every proposal against every GT with the Hungarian algorithm.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

NO_CANDIDATE_COST = 1e9  # official fill value; a row minimum >= 9e8 means "this GT has no candidate"


@torch.no_grad()
def restricted_matching(cost: Tensor, gt_indices: Tensor, eligible: Tensor) -> Tensor:
    """Per GT, its cheapest eligible candidate.

    Args:
        cost: (S,) matching cost of each proposal against its own GT.
        gt_indices: (S,) int64 index of that GT within the image.
        eligible: (S,) bool, proposals with IoU >= threshold to their argmax GT.

    Returns:
        (S,) bool: True for the one matched proposal of each GT that has a candidate. A GT without an
        eligible proposal stays unmatched (no loss is attached to it).
    """
    matched = torch.zeros_like(eligible)
    if not bool(eligible.any()):
        return matched
    num_gt = int(gt_indices[eligible].max()) + 1
    matrix = cost.new_full((num_gt, cost.shape[0]), NO_CANDIDATE_COST)
    columns = torch.nonzero(eligible).squeeze(1)
    matrix[gt_indices[columns], columns] = cost[columns]
    best_cost, best_column = matrix.min(dim=1)
    matched[best_column[best_cost < 0.9 * NO_CANDIDATE_COST]] = True
    return matched


@torch.no_grad()
def hungarian_matching(cost: Tensor) -> tuple[Tensor, Tensor]:
    """(G, S) cost of every GT against every proposal -> (gt_rows, proposal_columns) int64 of an
    optimal one-to-one assignment (``min(G, S)`` pairs)."""
    rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.int64, device=cost.device),
            torch.as_tensor(cols, dtype=torch.int64, device=cost.device))
