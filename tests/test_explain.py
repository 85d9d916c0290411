"""``sparsedet predict --explain``: the CSQ figure for QueryDet, a clear error for other models."""
from __future__ import annotations

import pytest
import torch

from sparsedet.explain import explain_prediction
from sparsedet.models import build_model

TINY = {"name": "querydet", "num_classes": 3, "backbone": {"depth": 18, "weights": None},
        "fpn": {"channels": 32}, "head": {"num_convs": 2}, "query": {"num_convs": 2}}


def _image():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 96, 128, generator=g) * 255


def test_explain_draws_csq_maps_and_leaves_the_model_as_it_was(single_thread):
    model = build_model({"model": TINY, "input": {"min_size_test": 96, "max_size_test": 128}}).eval()
    with torch.no_grad():  # make a controlled part of P4 fire: every query fires, then none at P3
        model.query_head.predictors[0].bias.fill_(30.0)
    assert not model.cfg.csq.enabled
    picture = explain_prediction(model, _image())
    assert picture.size[0] > 300 and picture.size[1] > 300
    assert not model.cfg.csq.enabled and not model.training
    stats = model.last_csq.stats()
    assert stats["start_queries"] == 6 * 8  # P4 of a 96x128 input, all fired
    assert stats["levels"][3]["children"] == 12 * 16


def test_explain_refuses_models_without_a_query_head():
    model = build_model("sparse_rcnn/r50_fpn_100pro_3x", ["model.backbone.depth=18", "model.num_proposals=4"])
    with pytest.raises(ValueError, match="query head"):
        explain_prediction(model, _image())
