"""ONNX export: onnxruntime's detections equal PyTorch's on real images, for every detector; dynamic
input sizes; one clear error for each bad input."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from sparsedet.export import ExportableDetector, export_onnx, onnx_session, supported_opsets  # noqa: E402
from sparsedet.models import build_model  # noqa: E402

R18 = {"depth": 18, "weights": None}
# Tiny versions of every detector; score threshold 0 so random weights still give many detections,
# and a prior of 0.2 gives scores around the threshold (the parity check needs detections through
# every step: threshold, NMS, top-k, padding).
TINY_MODELS = {
    "sparse_rcnn": {"name": "sparse_rcnn", "num_classes": 5, "backbone": R18, "hidden_dim": 32,
                    "fpn": {"channels": 32}, "num_proposals": 12, "num_stages": 2, "dim_feedforward": 64,
                    "dim_dynamic": 8, "loss": {"prior_prob": 0.2}},
    "retinanet": {"name": "retinanet", "num_classes": 5, "backbone": R18, "fpn": {"channels": 32},
                  "head": {"num_convs": 1, "prior_prob": 0.2}, "test": {"score_threshold": 0.0, "topk_candidates": 50}},
    "querydet": {"name": "querydet", "num_classes": 5, "backbone": R18, "fpn": {"channels": 32},
                 "head": {"num_convs": 1, "prior_prob": 0.2}, "query": {"num_convs": 1},
                 "test": {"score_threshold": 0.0, "topk_candidates": 50}},
    "fcos": {"name": "fcos", "num_classes": 5, "backbone": R18, "fpn": {"channels": 32},
             "head": {"num_convs": 1, "prior_prob": 0.2}, "test": {"score_threshold": 0.0, "topk_candidates": 50}},
    "faster_rcnn": {"name": "faster_rcnn", "num_classes": 5, "backbone": R18, "fpn": {"channels": 32},
                    "roi_heads": {"representation_size": 32, "score_threshold": 0.0},
                    "rpn": {"pre_nms_topk_test": 100, "post_nms_topk_test": 40}},
}
SCORE_THRESHOLD = 0.05

# TSP and ASAG: bundled configs shrunk by overrides, traced at 96x128, run at sizes where their
# data-dependent set sizes differ from the traced ones (TSP-RCNN's proposals after NMS: pre-NMS
# top-50 per level; ASAG's adaptive anchors: the min_anchors fallback at 96x128, kept fixed anchors
# plus P4 probing at 200x264). ASAG's classifier biases are zeroed so that random weights score
# above SCORE_THRESHOLD; a high_threshold of 0.535 keeps some fixed anchors out of probing.
TSP_RCNN = ["model.backbone.depth=18", "model.backbone.layout=torchvision", "model.backbone.weights=null",
            "model.fpn.channels=32", "model.num_classes=5", "model.rpn.pre_nms_topk_test=50",
            "model.rpn.num_proposals=1000", "model.roi_heads.d_model=64", "model.roi_heads.num_heads=4",
            "model.roi_heads.num_layers=1", "model.roi_heads.dim_feedforward=64", "model.roi_heads.score_threshold=0.0"]
ASAG = ["model.backbone.depth=18", "model.backbone.weights=null", "model.hidden_dim=64", "model.fpn.channels=64",
        "model.dim_feedforward=128", "model.anchors.compress_hidden=8", "model.num_classes=3",
        "model.anchors.high_threshold=0.535"]
TINY_CONFIGS = {
    "tsp_fcos": ("tsp_fcos/mobilenetv2_fpn_cpu",
                 ["model.backbone.weights=null", "model.num_classes=5", "model.fpn.channels=32",
                  "model.head.num_groups=8", "model.transformer.d_model=32", "model.transformer.nhead=2",
                  "model.transformer.dim_feedforward=64", "model.foi.num_foi=50", "model.head.prior_prob=0.2",
                  "model.test.score_threshold=0.0"], [(96, 128), (80, 112), (128, 90)]),
    "tsp_rcnn": ("tsp_rcnn/r50_fpn_3x", TSP_RCNN, [(96, 128), (80, 112), (128, 90)]),
    "tsp_rcnn_cascade": ("tsp_rcnn/r50_fpn_cascade", TSP_RCNN, [(96, 128), (80, 112), (128, 90)]),
    "asag_a": ("asag/a_r50_fpn_100q_1x", ASAG, [(96, 128), (200, 264)]),        # setting 100: top-k only
    "asag_s": ("asag/s_r50_fpn_300q_3x", ASAG, [(96, 128), (200, 264)]),        # setting 300: with NMS
}
ASAG_D = ("asag/d_r50_300q_3x", ASAG + ["model.encoder.channels=64", "model.encoder.num_layers=1",
                                        "model.encoder.num_heads=4", "model.encoder.dim_feedforward=64",
                                        "model.encoder.norm_groups=8", "model.deformable_feedforward=64"])


def set_size(model) -> int:
    """The data-dependent set size of the last call: proposals (TSP-RCNN) or anchors (ASAG);
    TSP-FCOS keeps a fixed number of FoIs (its per-level candidate counts vary instead)."""
    if getattr(model, "last_rois", None) is not None:
        return len(model.last_rois[0]["boxes"])
    if getattr(model, "last_anchors", None) is not None:
        return int(model.last_anchors.boxes.shape[1])
    return 0


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    pass


def real_images(shared_data, size, count=1):
    """``count`` tiny_coco val images resized to (H, W), RGB 0-255 float."""
    from sparsedet.data.image_io import read_image

    paths = sorted((shared_data / "tiny_coco" / "val2017").glob("*.jpg"))[:count]
    images = [read_image(p).float() for p in paths]
    return torch.stack([torch.nn.functional.interpolate(im[None], size=size, mode="bilinear",
                                                        align_corners=False)[0].round() for im in images])


def assert_same_detections(onnx_outputs, torch_detections, max_detections):
    """Same detections above SCORE_THRESHOLD: count equal, each matched in order (scores 1e-4,
    boxes 1e-2 px, labels equal)."""
    boxes, scores, labels, counts = onnx_outputs
    for b, expected in enumerate(torch_detections):
        n = int(counts[b])
        assert n == min(len(expected["scores"]), max_detections)
        assert (scores[b, n:] == 0).all()
        got_scores = torch.from_numpy(scores[b, :n])
        keep_onnx = got_scores > SCORE_THRESHOLD
        keep_torch = expected["scores"][:max_detections] > SCORE_THRESHOLD
        assert int(keep_onnx.sum()) == int(keep_torch.sum()) > 0
        torch.testing.assert_close(got_scores[keep_onnx], expected["scores"][:max_detections][keep_torch],
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.from_numpy(boxes[b, :n])[keep_onnx],
                                   expected["boxes"][:max_detections][keep_torch], atol=1e-2, rtol=0)
        assert torch.equal(torch.from_numpy(labels[b, :n])[keep_onnx],
                           expected["labels"][:max_detections][keep_torch].to(torch.int64))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_onnxruntime_matches_pytorch_on_real_images(name, tmp_path, shared_data):
    """One dynamic export per detector, run at the traced size and at two others (neither a
    multiple of 32: the padding is inside the graph)."""
    torch.manual_seed(0)
    model = build_model({"model": TINY_MODELS[name]}).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx", image_size=(96, 128), dynamic=True, max_detections=30)
    session = onnx_session(path, threads=1)
    for size in [(96, 128), (80, 112), (128, 90)]:
        images = real_images(shared_data, size)
        outputs = session.run(None, {"images": images.numpy()})
        assert [o.shape for o in outputs] == [(1, 30, 4), (1, 30), (1, 30), (1,)]
        with torch.no_grad():
            expected = model(list(images))
        assert_same_detections(outputs, expected, 30)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tsp_and_asag_onnxruntime_matches_pytorch(name, tmp_path, shared_data):
    """Traced at 96x128 (dynamic), run at other sizes; every detection compared (K = 100 = the
    models' own maximum), and the proposal / anchor counts differ from size to size."""
    config, overrides, sizes = TINY_CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(config, overrides).eval()
    for param_name, param in model.named_parameters():
        if name.startswith("asag") and param_name.endswith(("fc_cls.bias", "class_logits.bias")):
            torch.nn.init.zeros_(param)
    path = export_onnx(model, tmp_path / f"{name}.onnx", image_size=(96, 128), dynamic=True, max_detections=100)
    session = onnx_session(path, threads=1)
    counts = set()
    for size in sizes:
        images = real_images(shared_data, size)
        outputs = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected = model(list(images))
        counts.add(set_size(model))
        assert_same_detections(outputs, expected, 100)
    if not name.startswith("tsp_fcos"):
        assert len(counts) == len(sizes), f"the sizes did not change the {name} set size: {counts}"


def test_asag_fast_inference_is_refused_in_one_line(tmp_path):
    config, overrides, _ = TINY_CONFIGS["asag_a"]
    model = build_model(config, overrides + ["model.fast_inference=true"]).eval()
    with pytest.raises(ValueError, match="model.fast_inference=true is not exported"):
        export_onnx(model, tmp_path / "fast.onnx", image_size=(64, 64))


def test_asag_traceable_anchor_choices_equal_the_eager_branches():
    """The tensor forms used while tracing pick the same anchors, in the same order, as the
    Python branches of eager mode."""
    from sparsedet.models.asag.anchor_generator import _best_if_over, _fixed_part_choice

    scores = torch.rand(12, generator=torch.Generator().manual_seed(0))
    for threshold in (0.2, 0.9):  # enough anchors kept / too few (-> the 5 best of all)
        keep = scores > threshold
        expected = scores.topk(5).indices if int(keep.sum()) < 5 else keep.nonzero().squeeze(1)
        assert torch.equal(_fixed_part_choice(scores, keep, 5), expected)
    assert torch.equal(_best_if_over(scores, 20), torch.arange(12))
    assert torch.equal(_best_if_over(scores, 4), scores.topk(4).indices)


def test_traceable_attention_equals_pytorch():
    import torch.nn.functional as F

    from sparsedet.export_attention import traceable_attention

    torch.manual_seed(0)
    original = F.multi_head_attention_forward
    for batch_first in (False, True):
        mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        x = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
        bias, padding = torch.randn(8, 7, 7), torch.zeros(2, 7, dtype=torch.bool)
        padding[1, 5:] = True
        for kwargs in ({}, {"attn_mask": bias}, {"attn_mask": bias > 1, "key_padding_mask": padding}):
            expected = mha(x, x, x, need_weights=True, **kwargs)
            with traceable_attention():
                got = mha(x, x, x, need_weights=True, **kwargs)
            torch.testing.assert_close(got[0], expected[0])
            torch.testing.assert_close(got[1], expected[1])
    assert F.multi_head_attention_forward is original


def test_querydet_with_csq_exports_the_dense_model(tmp_path, shared_data):
    torch.manual_seed(0)
    model = build_model({"model": {**TINY_MODELS["querydet"], "csq": {"enabled": True}}}).eval()
    path = export_onnx(model, tmp_path / "q.onnx", image_size=(96, 128), max_detections=30)  # static size
    assert model.cfg.csq.enabled  # restored after the export
    images = real_images(shared_data, (96, 128))
    model.cfg.csq.enabled = False
    with torch.no_grad():
        dense = model(list(images))
    assert_same_detections(onnx_session(path).run(None, {"images": images.numpy()}), dense, 30)


def test_padding_wrapper_counts_and_zero_fills():
    class Fixed(torch.nn.Module):
        training = False

        def forward(self, images):
            return [{"boxes": torch.ones(n, 4), "scores": torch.full((n,), 0.5), "labels": torch.full((n,), 2)}
                    for n in (3, 7)]

    boxes, scores, labels, counts = ExportableDetector(Fixed(), max_detections=5)(torch.zeros(2, 3, 8, 8))
    assert counts.tolist() == [3, 5]
    assert boxes.shape == (2, 5, 4) and scores[0].tolist() == [0.5] * 3 + [0.0] * 2
    assert labels[0].tolist() == [2, 2, 2, 0, 0]


def test_bad_inputs_give_one_clear_line(tmp_path):
    model = build_model({"model": TINY_MODELS["retinanet"]})
    with pytest.raises(ValueError, match="eval-mode model: call model.eval"):
        export_onnx(model, tmp_path / "m.onnx")
    model.eval()
    with pytest.raises(ValueError, match=r"opset 7 is not supported: choose 16\.\."):
        export_onnx(model, tmp_path / "m.onnx", opset=7)
    with pytest.raises(FileNotFoundError, match="output folder .*missing does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx")
    assert supported_opsets()[0] == 16


def test_cli_export(tmp_path, capsys):
    from sparsedet.cli import main

    out = tmp_path / "r.onnx"
    overrides = ["model.backbone.depth=18", "model.backbone.layout=torchvision", "model.backbone.weights=null",
                 "model.fpn.channels=32", "model.head.num_convs=1", "model.num_classes=3"]
    assert main(["export", "retinanet/r50_fpn_1x_coco", "--output", str(out), "--image-size", "64", "96",
                 *overrides]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["export", "retinanet/r50_fpn_1x_coco", "--output", str(tmp_path / "no" / "r.onnx"),
                 *overrides]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_export_checkpoint_dynamic(tmp_path, capsys, shared_data):
    from sparsedet.checkpoint import save_atomic
    from sparsedet.cli import main

    torch.manual_seed(0)
    model = build_model({"model": TINY_MODELS["sparse_rcnn"]}).eval()
    save_atomic({"model": model.state_dict(), "config": model.config}, tmp_path / "tiny.pth")
    out = tmp_path / "tiny.onnx"
    assert main(["export", str(tmp_path / "tiny.pth"), "--output", str(out), "--dynamic",
                 "--max-detections", "12"]) == 0
    assert "(B=1, 3, H, W)" in capsys.readouterr().out
    images = real_images(shared_data, (70, 90))
    with torch.no_grad():
        expected = model(list(images))
    assert_same_detections(onnx_session(out).run(None, {"images": images.numpy()}), expected, 12)


def test_asag_d_exports_at_a_fixed_size_and_refuses_dynamic(tmp_path, shared_data):
    """ASAG-D (deformable encoder and head): onnxruntime equals PyTorch at the exported size;
    ``dynamic`` is refused in one line (the deformable attention's level shapes are traced as constants)."""
    torch.manual_seed(0)
    model = build_model(*ASAG_D).eval()
    for param_name, param in model.named_parameters():
        if param_name.endswith(("fc_cls.bias", "class_embed.bias")):
            torch.nn.init.zeros_(param)
    with pytest.raises(ValueError, match="fixed input size: drop --dynamic"):
        export_onnx(model, tmp_path / "asag_d_dynamic.onnx", image_size=(96, 128), dynamic=True)
    path = export_onnx(model, tmp_path / "asag_d.onnx", image_size=(96, 128), max_detections=100)
    images = real_images(shared_data, (96, 128))
    outputs = onnx_session(path, threads=1).run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(list(images))
    assert_same_detections(outputs, expected, 100)
