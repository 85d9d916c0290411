"""Batch inference: a batch of 4 images gives the detections of four single-image runs, for every
dense detector (RetinaNet, QueryDet dense and with Cascade Sparse Query, FCOS, QueryDet-FCOS)."""
from __future__ import annotations

import pytest
import torch

import sparsedet
from sparsedet.models import build_model

BASE = {"backbone": {"depth": 18, "weights": None}, "fpn": {"channels": 32}, "head": {"num_convs": 2}}
QUERY = {"query": {"num_convs": 2}}
# Random query heads give probabilities around 0.5: sigma 0.5 queries about half of the positions,
# so that the cascade reaches P2 with a different set of queries in every image.
CSQ = {"csq": {"enabled": True, "threshold": 0.5}}
MODELS = {
    "retinanet": {"name": "retinanet", "num_classes": 3, **BASE},
    "querydet_dense": {"name": "querydet", "num_classes": 3, **BASE, **QUERY},
    "querydet_csq": {"name": "querydet", "num_classes": 3, **BASE, **QUERY, **CSQ},
    "fcos": {"name": "fcos", "num_classes": 3, **BASE},
    "querydet_fcos_csq": {"name": "querydet_fcos", "num_classes": 3, **BASE, **QUERY, **CSQ},
}


@pytest.fixture(scope="module")
def same_size_images():
    g = torch.Generator().manual_seed(0)
    # Same size, so that batching adds no padding: any difference would come from the batching itself.
    return [torch.randint(0, 256, (3, 96, 128), generator=g).float() for _ in range(4)]


def _assert_same(batched, single):
    assert len(batched) == len(single)
    assert sum(s["labels"].numel() for s in single) > 0
    for b, s in zip(batched, single):
        assert b["labels"].shape == s["labels"].shape
        torch.testing.assert_close(b["boxes"], s["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(b["scores"], s["scores"], atol=1e-5, rtol=1e-4)
        assert torch.equal(b["labels"], s["labels"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_of_four_equals_four_single_runs(name, same_size_images, single_thread):
    torch.manual_seed(1)
    model = build_model({"model": MODELS[name]}).eval()
    with torch.no_grad():   # spread the scores of the (prior-initialised) detection head
        for module in model.head.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0.0, 0.05)
                module.bias.normal_(-1.0, 0.5)
    # Short side 96 keeps the images at their size (no resize): exactly the same network inputs.
    kwargs = dict(score_threshold=0.2, min_size=96, max_size=128)
    single = [sparsedet.predict(model, image, **kwargs)[0] for image in same_size_images]
    batched = sparsedet.predict(model, same_size_images, batch_size=4, **kwargs)
    _assert_same(batched, single)
    if getattr(model, "last_csq", None) is not None:
        # The batched cascade really ran on 4 images and reached P2.
        assert model.last_csq.start_query_logits.shape[0] == 4
        assert model.last_csq.level(2) is not None
    # A batch that does not divide the image count: 3 + 1.
    _assert_same(sparsedet.predict(model, same_size_images, batch_size=3, **kwargs), single)


def test_cli_batch_size_option():
    from sparsedet.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["predict", "w.pth", "a.jpg", "--batch-size", "4"]).batch_size == 4
    assert parser.parse_args(["predict", "w.pth", "a.jpg"]).batch_size == 1
    assert parser.parse_args(["eval", "w.pth", "--batch-size", "8"]).batch_size == 8
    assert parser.parse_args(["eval", "w.pth"]).batch_size is None          # the config's test.images_per_batch
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "w.pth", "a.jpg", "--batch-size", "0"])
