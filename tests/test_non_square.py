"""Non-square inputs (``--image-size HxW``) through every CLI verb, ONNX export and the model, for every method."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

import dmgrd
import dmgrd.visualize
from dmgrd.cli import main
from dmgrd.models import METHODS

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
HEIGHT, WIDTH = 64, 32  # tall, as KolektorSDD's 640x256
COMMON = ["--dataset", "synthetic", "--category", "object", "--device", "cpu", "--batch-size", "4"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_tall_model_trains_tests_predicts_and_exports(method, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *COMMON, "--method", method, "--backbone", "test_efficientnet", "--weights", "none",
                 "--image-size", f"{HEIGHT}x{WIDTH}", "--steps", "2", "--out", str(out)]) == 0
    model = dmgrd.load(out / "model.pt")
    assert model.config.size == (HEIGHT, WIDTH)
    assert main(["test", *COMMON, "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "test"),
                 "--no-overlays"]) == 0
    assert 0 <= json.loads((tmp_path / "test" / "metrics.json").read_text())["image_auroc"] <= 1
    images = dmgrd.data.Synthetic("test", "object", image_size=(HEIGHT, WIDTH), seed=0)
    batch = torch.stack([images[i]["image"] for i in range(3)])
    folder = tmp_path / "new"
    for i, image in enumerate(batch):
        dmgrd.visualize.save_png(dmgrd.visualize.to_uint8_image(image), folder / f"{i}.png")
    assert main(["predict", "--checkpoint", str(out / "model.pt"), str(folder), "--out", str(tmp_path / "pred"),
                 "--masks", "--device", "cpu"]) == 0
    masks = sorted((tmp_path / "pred").glob("*_mask.png"))
    assert len(masks) == 3 and np.asarray(PIL.Image.open(masks[0])).shape == (HEIGHT, WIDTH)
    prediction = model(batch)
    assert prediction.anomaly_map.shape == (3, 1, HEIGHT, WIDTH) and torch.isfinite(prediction.score).all()
    onnx = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(out / "model.pt"), "--out", str(onnx)]) == 0
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    maps, scores = session.run(["anomaly_map", "score"], {"images": batch.numpy()})
    scale = 1 + float(prediction.anomaly_map.abs().max())  # PatchCore's distances are not in [0, 1]
    assert np.abs(maps - prediction.anomaly_map.numpy()).max() < 1e-4 * scale
    assert np.abs(scores - prediction.score.numpy()).max() < 1e-4 * scale
