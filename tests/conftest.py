"""Shared fixtures: a tiny Sparse R-CNN (ResNet-18, d=64, 8 proposals, 2 stages, 5 classes)."""
from __future__ import annotations

import pytest
import torch

TINY_OVERRIDES = [
    "model.backbone.depth=18",
    "model.hidden_dim=64",
    "model.fpn.channels=64",
    "model.num_proposals=8",
    "model.num_stages=2",
    "model.dim_feedforward=128",
    "model.dim_dynamic=16",
    "model.num_classes=5",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def make_tiny():
    """``make_tiny(*extra_overrides)`` -> a tiny R-18 Sparse R-CNN in training mode."""
    from sparsedet.models import build_model

    def make(*extra: str):
        return build_model("sparse_rcnn/r50_fpn_100pro_3x", TINY_OVERRIDES + list(extra))

    return make


@pytest.fixture
def images():
    """Two RGB 0-255 images of different sizes (64x96 and 48x80)."""
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 64, 96, generator=g) * 255, torch.rand(3, 48, 80, generator=g) * 255]


@pytest.fixture
def targets():
    """Targets for ``images``: two boxes in image 0, one in image 1."""
    return [
        {"boxes": torch.tensor([[5.0, 8.0, 40.0, 50.0], [50.0, 10.0, 90.0, 60.0]]), "labels": torch.tensor([1, 4])},
        {"boxes": torch.tensor([[10.0, 5.0, 70.0, 40.0]]), "labels": torch.tensor([0])},
    ]


@pytest.fixture(scope="module")
def single_thread():
    """These tests use tiny tensors: one intra-op thread is as fast, and far faster when the CPU is
    shared (OpenMP threads spin-wait when oversubscribed). Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _shared_data_dir():
    import os
    from pathlib import Path

    configured = os.environ.get("SPARSEDET_DATA")
    return Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (or ``$SPARSEDET_DATA``): real images for loader, overfit and eval tests.

    Skipped with a reason when absent (a user's machine); on CI (``CI=true``) its absence fails.
    """
    import os

    root = _shared_data_dir()
    if not (root / "tiny_coco").is_dir():
        message = f"real test data not found at {root} (set SPARSEDET_DATA to the shared/data folder)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def overfit_batch(shared_data):
    """Two tiny_coco training images (1-3 objects each) at short side 256 with their targets, read
    once per session for the overfit tests (``overfit_helpers.RealBatch``)."""
    from overfit_helpers import tiny_coco_batch

    return tiny_coco_batch(shared_data)
