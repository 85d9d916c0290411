"""TSP-RCNN's matching of proposals to GT boxes (spec §3.7 step 3, §3.10).

The official matching is not Hungarian: each eligible proposal can only belong to its argmax-IoU GT,
so it is the shared ``restricted_matching.restricted_match`` (a per-GT argmin). ``restricted_matching``
here turns its per-GT answer into a per-proposal mask. The DETR-loss baseline matches every proposal
against every GT with the Hungarian algorithm.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .restricted_matching import restricted_match


@torch.no_grad()
def restricted_matching(cost: Tensor, gt_indices: Tensor, eligible: Tensor) -> Tensor:
    """Per GT, its cheapest eligible candidate, as a mask.

    Args:
        cost: (S,) matching cost of each proposal against its own GT.
        gt_indices: (S,) int64 index of that GT (unique over the batch).
        eligible: (S,) bool, proposals with IoU >= threshold to their argmax GT.

    Returns:
        (S,) bool: True for the one matched proposal of each GT that has a candidate. A GT without an
        eligible proposal stays unmatched (no loss is attached to it).
    """
    matched = torch.zeros_like(eligible)
    if not bool(eligible.any()):
        return matched
    index = torch.where(eligible, gt_indices, torch.full_like(gt_indices, -1))
    chosen = restricted_match(cost, index, int(gt_indices[eligible].max()) + 1)
    matched[chosen[chosen >= 0]] = True
    return matched


@torch.no_grad()
def hungarian_matching(cost: Tensor) -> tuple[Tensor, Tensor]:
    """(G, S) cost of every GT against every proposal -> (gt_rows, proposal_columns) int64 of an
    optimal one-to-one assignment (``min(G, S)`` pairs)."""
    rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.int64, device=cost.device),
            torch.as_tensor(cols, dtype=torch.int64, device=cost.device))
