"""Training/test transforms: boxes stay on their pixels through flips, crops and resizes."""
from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from sparsedet.data.transforms import (DetectionTransform, RandomAbsoluteRangeCrop, build_transforms,
                                       resize_shortest_edge, shortest_edge_size)

pytestmark = pytest.mark.usefixtures("single_thread")

COLOUR = torch.tensor([250, 20, 240], dtype=torch.uint8)

# The recipe's structure at a small scale (fast on CPU); crop always taken half the time.
SMALL_TRAIN = {"min_size_train": [96, 128, 160], "max_size_train": 240, "horizontal_flip": 0.5,
               "crop": {"enabled": True, "probability": 0.5, "first_resize": [100, 125, 150], "size": [60, 120]}}
RECIPE = {"min_size_train": [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], "max_size_train": 1333,
          "min_size_test": 800, "max_size_test": 1333, "horizontal_flip": 0.5,
          "crop": {"enabled": True, "probability": 0.5, "first_resize": [400, 500, 600], "size": [384, 600]}}


def _scene(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy dark background (every channel < 110) with one filled rectangle of ``COLOUR``."""
    g = torch.Generator().manual_seed(seed)
    height, width = int(torch.randint(120, 200, (), generator=g)), int(torch.randint(120, 200, (), generator=g))
    image = torch.randint(0, 110, (3, height, width), generator=g, dtype=torch.uint8)
    x1, y1 = int(torch.randint(0, width - 40, (), generator=g)), int(torch.randint(0, height - 40, (), generator=g))
    x2 = int(torch.randint(x1 + 30, width + 1, (), generator=g))
    y2 = int(torch.randint(y1 + 30, height + 1, (), generator=g))
    image[:, y1:y2, x1:x2] = COLOUR[:, None, None]
    return image, torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32)


def _colour_box(image: torch.Tensor) -> torch.Tensor | None:
    """Pixel-edge xyxy box of the pixels that are mostly ``COLOUR`` (red and blue above midway)."""
    mask = (image[0] > 180) & (image[2] > 175)
    if not mask.any():
        return None
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_train_pipeline_keeps_boxes_on_their_pixels():
    transform = build_transforms(SMALL_TRAIN, train=True)
    flipped = cropped = 0
    for seed in range(60):
        image, box = _scene(seed)
        torch.manual_seed(seed)
        out, boxes, labels = transform(image, box, torch.tensor([3]))
        assert out.dtype == torch.uint8 and out.shape[0] == 3
        assert boxes.dtype == torch.float32 and labels.tolist() in ([3], [])
        short, long = min(out.shape[1:]), max(out.shape[1:])
        assert short in (96, 128, 160) or long == 240, out.shape
        found = _colour_box(out)
        if len(boxes) == 0:  # the crop cut the rectangle away (or left a sliver thinner than a pixel)
            assert found is None or (found[2:] - found[:2]).min() <= 2
            cropped += 1
            continue
        assert found is not None
        assert torch.allclose(found, boxes[0], atol=1.5), (seed, found, boxes[0])
        x1, y1, x2, y2 = boxes[0].round().int().tolist()
        inside = out[:, y1 + 2:y2 - 2, x1 + 2:x2 - 2].reshape(3, -1).float()
        if inside.shape[1]:
            assert torch.allclose(inside.mean(dim=1), COLOUR.float(), atol=3)
        scale = out.shape[2] / image.shape[2]
        flipped += abs(boxes[0, 0] - box[0, 0] * scale) > 2  # not a pure resize: flip or crop happened
    assert flipped >= 10  # the random branches were exercised


def test_flip_alone_mirrors_boxes_exactly():
    transform = DetectionTransform(v2.RandomHorizontalFlip(p=1.0))
    image, box = _scene(1)
    out, boxes, _ = transform(image, box, torch.tensor([0]))
    width = image.shape[2]
    assert torch.equal(out, image.flip(-1))
    assert boxes.tolist() == [[width - box[0, 2].item(), box[0, 1].item(), width - box[0, 0].item(), box[0, 3].item()]]


@pytest.mark.parametrize("height, width", [(480, 640), (427, 640), (640, 359), (333, 1999), (801, 800)])
def test_test_transform_matches_predict_resize(height, width):
    transform = build_transforms(RECIPE, train=False)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 200.0]])
    out, out_boxes, _ = transform(image, boxes, torch.tensor([1]))
    assert tuple(out.shape[1:]) == shortest_edge_size(height, width, 800, 1333)
    assert torch.equal(out, resize_shortest_edge(image, 800, 1333))  # evaluation == sparsedet.predict
    scale = torch.tensor([out.shape[2] / width, out.shape[1] / height] * 2)
    assert torch.allclose(out_boxes, boxes * scale, atol=1e-3)
    assert max(out.shape[1:]) <= 1333


def test_test_transform_is_deterministic():
    transform = build_transforms(RECIPE, train=False)
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    torch.manual_seed(0)
    first = transform(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    torch.manual_seed(1)
    second = transform(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert torch.equal(first[0], second[0]) and first[1].shape == (0, 4)


@pytest.mark.parametrize("height, width", [(700, 900), (300, 500), (600, 384)])
def test_absolute_range_crop_bounds(height, width):
    crop = RandomAbsoluteRangeCrop(384, 600)
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    torch.manual_seed(0)
    sizes_h, sizes_w = set(), set()
    for _ in range(300):
        p = crop.make_params([image])
        assert min(height, 384) <= p["height"] <= min(height, 600)
        assert min(width, 384) <= p["width"] <= min(width, 600)
        assert 0 <= p["top"] <= height - p["height"] and 0 <= p["left"] <= width - p["width"]
        sizes_h.add(p["height"])
        sizes_w.add(p["width"])
    # Drawn independently and uniformly over the whole range (both ends reachable).
    if height >= 600:
        assert min(sizes_h) < 400 and max(sizes_h) > 584
    if width >= 600:
        assert min(sizes_w) < 400 and max(sizes_w) > 584 and len(sizes_w) > 100


def test_recipe_crop_branch_output_sizes():
    """The real recipe: outputs are one of the multi-scale sizes whether or not the crop ran."""
    transform = build_transforms(RECIPE, train=True)
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
    for seed in range(6):
        torch.manual_seed(seed)
        out, _, _ = transform(image, torch.tensor([[10.0, 10.0, 50.0, 50.0]]), torch.tensor([0]))
        assert min(out.shape[1:]) in RECIPE["min_size_train"] or max(out.shape[1:]) == 1333


def test_degenerate_boxes_dropped_after_crop_with_labels():
    """A 10x10 grid of 10 px boxes, label = cell number; pixels encode their own coordinates, so
    the crop window can be read off the output and the surviving boxes checked exactly."""
    ys, xs = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    image = torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8)
    cells = [(x, y) for y in range(0, 100, 10) for x in range(0, 100, 10)]
    boxes = torch.tensor([[x, y, x + 10, y + 10] for x, y in cells], dtype=torch.float32)
    boxes = torch.cat([boxes, torch.tensor([[5.0, 5.0, 5.0, 9.0]])])  # zero width: always dropped
    labels = torch.arange(len(boxes))
    transform = DetectionTransform(RandomAbsoluteRangeCrop(35, 55))
    for seed in range(20):
        torch.manual_seed(seed)
        out, out_boxes, out_labels = transform(image, boxes, labels)
        left, top = int(out[0, 0, 0]), int(out[1, 0, 0])
        height, width = out.shape[1:]
        expected = [i for i, (x, y) in enumerate(cells)
                    if min(x + 10, left + width) - max(x, left) > 0 and min(y + 10, top + height) - max(y, top) > 0]
        assert out_labels.tolist() == expected
        shifted = boxes[expected] - torch.tensor([left, top, left, top])
        shifted[:, 0::2] = shifted[:, 0::2].clamp(0, width)
        shifted[:, 1::2] = shifted[:, 1::2].clamp(0, height)
        assert torch.equal(out_boxes, shifted)
        assert ((out_boxes[:, 2:] - out_boxes[:, :2]) > 1e-5).all()


@pytest.mark.parametrize("change, message", [
    ({"min_size_train": None}, r"input\.min_size_train: expected a positive integer"),
    ({"max_size_train": -1}, r"input\.max_size_train"),
    ({"horizontal_flip": 2}, r"input\.horizontal_flip: expected a probability"),
    ({"crop": {"enabled": True, "probability": 0.5, "first_resize": [400], "size": [384]}}, r"input\.crop\.size"),
    ({"crop": {"enabled": True, "probability": 0.5, "first_resize": "x", "size": [1, 2]}}, r"input\.crop\.first_resize"),
])
def test_build_transforms_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        build_transforms(dict(RECIPE, **change), train=True)
