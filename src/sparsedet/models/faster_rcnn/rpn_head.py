"""The RPN head with a query branch (paper table 9): a shared trunk of 3x3 convs + ReLU and three
predictors on it: objectness (A), anchor deltas (4A) and the query logit (1)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ...layers.conv_tower import ConvTower
from ..dense.head import flatten_level


class TowerView:
    """A ConvTower-like *view* of some predictors of a tower: the same trunk modules and a subset of the
    predictors (shared, not copied; not registered as a submodule, so the state_dict is unchanged).

    Why: ``cascade_sparse_query`` takes the query tower and the value towers separately, while the RPN
    has one trunk feeding all three predictors. Passing ``view([query])`` and ``view([objectness,
    deltas])`` lets the generic driver run it; ``sparse_towers`` sees that both views hold the same
    trunk modules and evaluates the trunk once per active set.
    """

    def __init__(self, tower: ConvTower, predictor_indices: Sequence[int]):
        self.subnet = tower.subnet
        self.predictors = [tower.predictors[i] for i in predictor_indices]
        self._tower = tower

    def __call__(self, x: Tensor) -> list[Tensor]:
        x = self._tower.trunk(x)
        return [p(x) for p in self.predictors]


class RPNHead(nn.Module):
    """``tower``: ``ConvTower(C, num_convs, (A, 4A[, 1]), predictor_kernel_size)``.

    Channel layouts (detectron2 ``StandardRPNHead``): objectness channel a; delta channel a * 4 + d,
    d in (dx, dy, dw, dh); the anchors follow ``AnchorGenerator``'s order. No normalisation layers, so
    the trunk can be evaluated sparsely. Init (detectron2): every conv N(0, 0.01), bias 0.

    Args:
        in_channels: FPN channels (also the trunk width).
        num_anchors: A per position.
        num_convs: trunk depth (paper 3).
        with_query: add the 1-channel query predictor (index 2).
        predictor_kernel_size: 1 (detectron2) or 3.
    """

    OBJECTNESS, DELTAS, QUERY = 0, 1, 2

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 3, with_query: bool = True,
                 predictor_kernel_size: int = 1):
        super().__init__()
        self.num_anchors = num_anchors
        self.with_query = with_query
        outputs = (num_anchors, 4 * num_anchors) + ((1,) if with_query else ())
        self.tower = ConvTower(in_channels, num_convs, outputs, predictor_kernel_size=predictor_kernel_size)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        self.value_view = TowerView(self.tower, (self.OBJECTNESS, self.DELTAS))
        self.query_view = TowerView(self.tower, (self.QUERY,)) if with_query else None

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Optional[Tensor]]]:
        """
        Args:
            features: per level, (B, C, H_l, W_l).

        Returns:
            objectness: per level, (B, H_l * W_l * A) logits, rows (y * W + x) * A + a.
            deltas: per level, (B, H_l * W_l * A, 4).
            query: per level, (B, H_l, W_l) query logits (None without the query branch).
        """
        objectness, deltas, query = [], [], []
        for feature in features:
            outs = self.tower(feature)
            objectness.append(flatten_level(outs[self.OBJECTNESS], self.num_anchors, 1).squeeze(2))
            deltas.append(flatten_level(outs[self.DELTAS], self.num_anchors, 4))
            query.append(outs[self.QUERY][:, 0] if self.with_query else None)
        return objectness, deltas, query
