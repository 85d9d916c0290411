"""A check shared by the ASAG detector tests (ASAG-S/-A and ASAG-D)."""
from __future__ import annotations

import torch


def assert_batch_of_three_equals_singles(model) -> None:
    """Padded anchor sets with valid masks (spec §1.7): a batch of three images whose anchor counts
    differ gives each image the detections of a batch of one. ``model`` is an eval-mode ASAG model."""
    with torch.no_grad():  # sharper anchor scores than at init, so that images keep different anchor counts
        for mlp in (model.anchor_generator.proj_all, model.anchor_generator.proj_patch):
            mlp.layers[2].weight.mul_(30)
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 160, 224, generator=g) * 255 for _ in range(3)]
    images[1][:, :80] = 0
    with torch.no_grad():
        batched = model(images)
        counts = model.last_anchors.valid.sum(1).tolist()
        singles = [model([img])[0] for img in images]
    assert len(set(counts)) > 1, "the case needs different anchor counts per image"
    for b, s in zip(batched, singles):
        assert torch.allclose(b["scores"], s["scores"], atol=1e-5)
        assert torch.allclose(b["boxes"], s["boxes"], atol=1e-3)
        assert torch.equal(b["labels"], s["labels"])
