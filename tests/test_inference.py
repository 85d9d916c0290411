"""sparsedet.load / predict / the CLI: what a user touches first."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sparsedet
from sparsedet.checkpoint import save_atomic
from sparsedet.cli import main
from sparsedet.convert.sparse_rcnn import sparsedet_to_official_key
from sparsedet.data.transforms import resize_shortest_edge, shortest_edge_size

from conftest import TINY_OVERRIDES


def _outputs_equal(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("boxes", "scores", "labels"))


def test_load_bare_state_dict_infers_architecture(tmp_path, make_tiny, images):
    model = make_tiny().eval()
    save_atomic(model.state_dict(), tmp_path / "tiny.pth")
    loaded = sparsedet.load(tmp_path / "tiny.pth")
    assert not loaded.training
    assert loaded.num_proposals == 8 and loaded.num_classes == 5 and len(loaded.head.head_series) == 2
    with torch.no_grad():
        assert _outputs_equal(model(images), loaded(images))


def test_load_checkpoint_with_config(tmp_path, make_tiny, images):
    model = make_tiny("model.proposal_init=grid").eval()
    save_atomic({"model": model.state_dict(), "config": model.config}, tmp_path / "ckpt.pth")
    loaded = sparsedet.load(tmp_path / "ckpt.pth")
    assert loaded.cfg.proposal_init == "grid"
    with torch.no_grad():
        assert _outputs_equal(model(images), loaded(images))


def test_load_and_convert_official_layout(tmp_path, make_tiny, images):
    model = make_tiny().eval()
    official = {sparsedet_to_official_key(k): v for k, v in model.state_dict().items()}
    assert any(k.startswith("backbone.bottom_up.res2.") for k in official)
    torch.save(official, tmp_path / "official.pth")
    with torch.no_grad():
        expected = model(images)
        assert _outputs_equal(expected, sparsedet.load(tmp_path / "official.pth")(images))
    assert main(["convert", "sparse_rcnn", str(tmp_path / "official.pth"), str(tmp_path / "ours.pth")]) == 0
    rebuilt = sparsedet.build_model("sparse_rcnn/r50_fpn_100pro_3x", TINY_OVERRIDES).eval()
    rebuilt.load_state_dict(torch.load(tmp_path / "ours.pth", weights_only=True))
    with torch.no_grad():
        assert _outputs_equal(expected, rebuilt(images))


def test_load_refuses_other_architecture(tmp_path):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.save(fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).state_dict(), tmp_path / "frcnn.pth")
    with pytest.raises(ValueError, match="architecture|backbone"):
        sparsedet.load(tmp_path / "frcnn.pth")
    assert main(["convert", "sparse_rcnn", str(tmp_path / "frcnn.pth"), str(tmp_path / "out.pth")]) == 1
    assert not (tmp_path / "out.pth").exists()


def test_predict_maps_boxes_to_original_pixels(make_tiny):
    model = make_tiny().eval()
    model.config["input"].update(min_size_test=64, max_size_test=128)
    image = torch.rand(3, 100, 150) * 255
    [result] = sparsedet.predict(model, image, score_threshold=0.0)
    resized = resize_shortest_edge(image, 64, 128)
    assert tuple(resized.shape[-2:]) == shortest_edge_size(100, 150, 64, 128) == (64, 96)
    with torch.no_grad():
        [direct] = model([resized], original_sizes=[(100, 150)])
    order = direct["scores"].argsort(descending=True)
    assert torch.allclose(result["boxes"], direct["boxes"][order])
    assert (result["boxes"][:, 2] <= 150).all() and (result["boxes"][:, 3] <= 100).all()
    assert (result["scores"][:-1] >= result["scores"][1:]).all()
    assert model.config["input"]["min_size_test"] == 64 and not model.training


def test_predict_reads_image_files(shared_data, make_tiny):
    model = make_tiny().eval()
    path = sorted((shared_data / "tiny_coco" / "val2017").glob("*.jpg"))[0]
    [result] = sparsedet.predict(model, [path], score_threshold=0.5, min_size=96, max_size=160)
    assert result["boxes"].shape[1] == 4 and (result["scores"] >= 0.5).all()


def test_shortest_edge_size_respects_max_size():
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(100, 1000, 800, 1333) == (133, 1333)


def test_cli_help_and_configs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "convert" in capsys.readouterr().out
    assert main(["configs"]) == 0
    assert "sparse_rcnn/r50_fpn_100pro_3x" in capsys.readouterr().out.split()


def test_python_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "sparsedet", "convert", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "weights_only=True" in result.stdout
