"""The command line end to end on the built-in Synthetic data: train, test, predict, export, resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_report import check_order, check_report, read_report

import dmgrd
from dmgrd.cli import main

COMMON = ["--dataset", "synthetic", "--category", "texture", "--device", "cpu", "--batch-size", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *COMMON, "--method", "rd4ad", "--backbone", "efficientnet_lite0", "--image-size", "64",
                 "--steps", "40", "--checkpoint-every", "20", "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoint_config_log_and_thresholds(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["method"] == "rd4ad" and config["validation_images"] > 0
    assert config["thresholds"]["pixel"] > 0
    rows = list(csv.DictReader((trained / "train_log.csv").open()))
    assert len(rows) == 40 and float(rows[-1]["loss"]) < float(rows[0]["loss"])  # 20 --seed values: 0.38-0.42
    model, extra = dmgrd.models.read_checkpoint(trained / "model.pt")
    assert extra["train_state"]["step"] == 40 and model.thresholds == config["thresholds"]


def test_config_records_every_option_and_the_environment(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["seed"] == 111 and config["steps"] == 40 and config["image_size"] == "64"
    assert config["backbone"] == "efficientnet_lite0" and config["checkpoint"] == "model.pt"
    environment = config["environment"]
    assert environment["packages"]["torch"] != "not installed" and environment["dmgrd"] == dmgrd.__version__
    assert set(environment["packages"]) >= {"torch", "torchvision", "triton", "numpy"}
    assert environment["extension"]["build"] == dmgrd._extension.status().build_info
    assert "out" not in config and "resume" not in config


def test_the_written_config_retrains_to_the_same_model_and_metrics(trained, tmp_path):
    again = tmp_path / "again"
    assert main(["train", "--config", str(trained / "config.json"), "--out", str(again)]) == 0
    first, second = (json.loads((run / "config.json").read_text()) for run in (trained, again))
    assert second == first  # every option, the thresholds, the environment
    assert (again / "train_log.csv").read_text() == (trained / "train_log.csv").read_text()
    metrics = []
    for run in (trained, again):
        assert main(["test", *COMMON, "--checkpoint", str(run / "model.pt"), "--out", str(run / "test"),
                     "--no-overlays"]) == 0
        metrics.append(json.loads((run / "test" / "metrics.json").read_text()))
    assert metrics[0] == metrics[1] and metrics[0]["image_auroc"] > 0.5


def test_command_line_options_override_the_config_file(trained, tmp_path):
    out = tmp_path / "shorter"
    assert main(["train", "--config", str(trained / "config.json"), "--steps", "3", "--seed=5", "--out",
                 str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 3 and config["seed"] == 5 and config["method"] == "rd4ad"
    assert len(list(csv.DictReader((out / "train_log.csv").open()))) == 3


def test_checkpointed_activations_train_the_same_run(trained, tmp_path):
    out = tmp_path / "recomputed"
    assert main(["train", "--config", str(trained / "config.json"), "--steps", "5", "--checkpoint-activations",
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["checkpoint_activations"] is True
    plain = tmp_path / "plain"
    assert main(["train", "--config", str(trained / "config.json"), "--steps", "5", "--out", str(plain)]) == 0
    rows = [list(csv.DictReader((run / "train_log.csv").open())) for run in (plain, out)]
    for a, b in zip(*rows, strict=True):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-6)


def test_bad_config_files(tmp_path):
    path = tmp_path / "config.json"
    for text, message in [('{"steps": 3, "stepz": 4}', "unknown train option.*stepz"),
                          ("[1, 2]", "must hold a JSON object"), ("{steps: 3", "cannot read config file")]:
        path.write_text(text)
        with pytest.raises(SystemExit, match=message):
            main(["train", "--config", str(path), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="config file not found"):
        main(["train", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "run")])
    path.write_text('{"method": "nope"}')
    with pytest.raises(SystemExit):  # argparse: invalid choice 'nope' for --method
        main(["train", "--config", str(path), "--out", str(tmp_path / "run")])


def test_a_preset_the_method_lacks_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="rd4ad has no preset 'light'; its presets: clean, official"):
        main(["train", *COMMON, "--method", "rd4ad", "--preset", "light", "--out", str(out)])
    assert not out.exists()


def test_train_help_names_each_methods_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "clean, official (every method); dmgrd also: light" in text


def test_test_command_outputs_and_the_model_learned(trained, tmp_path):
    out = tmp_path / "test"
    assert main(["test", *COMMON, "--checkpoint", str(trained / "model.pt"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "pixel_f1max"}
    assert metrics["image_auroc"] >= 0.9, metrics  # over 20 --seed values (train and test): 0.971-1.0
    scores = list(csv.DictReader((out / "scores.csv").open()))
    assert {row["label"] for row in scores} == {"0", "1"}
    panels = sorted((out / "overlays").glob("*.png"))
    assert len(panels) == len(scores)
    panel = np.asarray(Image.open(panels[0]))
    assert panel.shape[0] == 64 and panel.shape[1] == 4 * 64 + 3 * 4  # image | map | overlay | truth
    assert Image.open(out / "roc.png").size[0] > 100


def test_test_report_shows_every_test_image_with_the_model_scores(trained, tmp_path):
    out = tmp_path / "report"
    assert main(["test", *COMMON, "--checkpoint", str(trained / "model.pt"), "--out", str(tmp_path / "test"),
                 "--no-overlays", "--report", str(out)]) == 0
    model = dmgrd.load(trained / "model.pt")
    data = dmgrd.data.Synthetic(split="test", category="texture", image_size=64, seed=111)
    results = dmgrd.engine.predict(model, data, progress=False)
    _, summary = check_report(out, results)
    assert summary["metrics"] == json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert summary["thresholds"] == model.thresholds
    first = summary["images"][0]
    image = np.asarray(Image.open(out / first["files"]["image"]))
    assert image.shape == (64, 64, 3)
    expected = data[first["index"]]["image"].permute(1, 2, 0).numpy()
    assert np.abs(image / 255 - expected).max() <= 0.5 / 255 + 1e-6


def test_test_report_needs_thresholds(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *COMMON, "--method", "patchcore", "--backbone", "efficientnet_lite0", "--image-size", "64",
                 "--steps", "1", "--val-fraction", "0", "--out", str(out)]) == 0
    with pytest.raises(SystemExit, match="--report needs decision thresholds"):
        main(["test", *COMMON, "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "t"), "--report",
              str(tmp_path / "r")])


def test_unified_training_on_two_categories_has_metrics_and_thresholds_per_category(tmp_path):
    data = ["--data", "synthetic:texture", "--data", "synthetic:object"]
    run = tmp_path / "run"
    assert main(["train", *data, "--device", "cpu", "--method", "rd4ad", "--backbone", "efficientnet_lite0",
                 "--image-size", "64", "--steps", "20", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == ["synthetic:texture", "synthetic:object"]
    model = dmgrd.load(run / "model.pt")
    names = ["synthetic-texture", "synthetic-object"]
    assert list(model.category_thresholds) == names and config["category_thresholds"] == model.category_thresholds
    train = dmgrd.data.Categories({n: dmgrd.data.Synthetic("train", n.split("-")[1], 64, seed=111) for n in names})
    _, validation = dmgrd.engine.split_validation(train, 0.1, 111)
    for name in names:  # each category's thresholds are those of its own validation images alone
        own = torch.utils.data.Subset(train, [i for i in validation.indices if train.category_of(i) == name])
        alone = dmgrd.load(run / "model.pt")
        dmgrd.engine.calibrate_thresholds(alone, own)
        assert model.category_thresholds[name] == pytest.approx(alone.thresholds, rel=1e-6)
        assert model.thresholds_for(name) == model.category_thresholds[name]
    assert model.category_thresholds[names[0]] != model.category_thresholds[names[1]]
    out = tmp_path / "test"
    assert main(["test", *data, "--device", "cpu", "--checkpoint", str(run / "model.pt"), "--out", str(out),
                 "--no-overlays", "--report", str(out / "report")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["per_category"]) == names and metrics["image_auroc"] > 0.5
    alone = dmgrd.engine.evaluate(model, dmgrd.data.Synthetic("test", "object", 64, seed=111), progress=False)
    assert metrics["per_category"]["synthetic-object"] == pytest.approx(alone, abs=1e-6)  # the second: offsets
    _, summary = read_report(out / "report")
    assert summary["category_metrics"] == metrics["per_category"]
    assert {e["category"] for e in summary["images"]} == set(names) and len(summary["images"]) == 200
    check_order(summary)
    images = tmp_path / "images"
    images.mkdir()
    Image.open(out / "report" / summary["images"][0]["files"]["image"]).save(images / "one.png")
    amap = model(dmgrd.data.read_image(images / "one.png")[None]).anomaly_map[0, 0]
    for category in names:  # predict judges by that category's thresholds
        assert main(["predict", "--checkpoint", str(run / "model.pt"), str(images), "--out", str(tmp_path / category),
                     "--category", category, "--masks", "--device", "cpu"]) == 0
        own = model.category_thresholds[category]
        row = next(csv.DictReader((tmp_path / category / "scores.csv").open()))
        assert int(row["anomalous"]) == int(float(row["score"]) > own["image"])
        mask = np.asarray(Image.open(tmp_path / category / "one_mask.png")) == 255
        assert np.array_equal(mask, (amap > own["pixel"]).numpy())
    with pytest.raises(SystemExit, match="no thresholds of category 'bottle'"):
        main(["predict", "--checkpoint", str(run / "model.pt"), str(images), "--out", str(tmp_path / "p"),
              "--category", "bottle"])


def write_test_images(folder: Path) -> Path:
    """A normal and a defective Synthetic test image as PNG files in ``folder``."""
    folder.mkdir()
    data = dmgrd.data.Synthetic(split="test", category="texture", image_size=64, seed=111)
    for i in (0, len(data) - 1):
        array = (data[i]["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"img{i}.png")
    return folder


def test_predict_writes_scores_overlays_maps_and_masks(trained, tmp_path):
    images = write_test_images(tmp_path / "images")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained / "model.pt"), str(images), "--out", str(out), "--masks",
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 2 and all(float(r["score"]) > 0 for r in rows)
    assert [r["anomalous"] for r in rows] == ["0", "1"]  # the normal image and the defective one
    assert all(0 <= float(r["normalized_score"]) <= 1 for r in rows)
    assert float(rows[0]["normalized_score"]) <= 0.5 < float(rows[1]["normalized_score"])
    for row in rows:
        stem = Path(row["path"]).stem
        assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == (64, 64, 3)
        amap = np.asarray(Image.open(out / f"{stem}_map.tiff"))
        assert amap.shape == (64, 64) and amap.dtype == np.float32
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert np.array_equal(mask == 255, amap > dmgrd.load(trained / "model.pt").thresholds["pixel"])


def test_predict_takes_a_checkpoint_onnx_or_openvino_alike(trained, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    images = write_test_images(tmp_path / "images")
    formats = {"checkpoint": trained / "model.pt", "onnx": tmp_path / "model.onnx"}
    assert main(["export", "--checkpoint", str(formats["checkpoint"]), "--out", str(formats["onnx"])]) == 0
    try:
        import openvino  # noqa: F401
        formats["openvino"] = tmp_path / "model.xml"
        assert main(["export", "--checkpoint", str(formats["checkpoint"]), "--format", "openvino", "--out",
                     str(formats["openvino"])]) == 0
    except ImportError:
        pass  # test_infer.py says that it is skipped
    found = {}
    for kind, path in formats.items():
        out = tmp_path / kind
        assert main(["predict", "--model", str(path), str(images), "--out", str(out), "--masks"]) == 0
        rows = list(csv.DictReader((out / "scores.csv").open()))
        masks = [np.asarray(Image.open(out / f"{Path(r['path']).stem}_mask.png")) for r in rows]
        found[kind] = rows, masks
    want_rows, want_masks = found.pop("checkpoint")
    for rows, masks in found.values():
        assert [r["anomalous"] for r in rows] == [r["anomalous"] for r in want_rows]
        for got, want in zip(rows, want_rows, strict=True):
            assert abs(float(got["score"]) - float(want["score"])) < 1e-4
            assert abs(float(got["normalized_score"]) - float(want["normalized_score"])) < 1e-4
        assert all(np.array_equal(a, b) for a, b in zip(masks, want_masks, strict=True))


def test_predict_tiles_images_at_their_own_size(trained, tmp_path):
    image = tmp_path / "large.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 100, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained / "model.pt"), str(image), "--out", str(out), "--masks",
                 "--tile", "input", "--stride", "32x48"]) == 0
    assert np.asarray(Image.open(out / "large_map.tiff")).shape == (150, 100)
    assert np.asarray(Image.open(out / "large_mask.png")).shape == (150, 100)
    assert np.asarray(Image.open(out / "large_overlay.png")).shape == (150, 100, 3)
    row = next(csv.DictReader((out / "scores.csv").open()))
    want = dmgrd.Inferencer(trained / "model.pt").predict_tiled(image, stride=(32, 48))
    assert float(row["score"]) == pytest.approx(want.score, rel=1e-6)
    with pytest.raises(SystemExit):  # argparse: the tile is HxW or 'input'
        main(["predict", "--checkpoint", str(trained / "model.pt"), str(image), "--out", str(out), "--tile", "big"])


def test_predict_bad_paths(trained, tmp_path):
    with pytest.raises(SystemExit, match="no such file or folder"):
        main(["predict", "--checkpoint", str(trained / "model.pt"), str(tmp_path / "nope.png"), "--out",
              str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images in folder"):
        main(["predict", "--checkpoint", str(trained / "model.pt"), str(tmp_path / "empty"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="not a dmgrd checkpoint"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        main(["predict", "--checkpoint", str(tmp_path / "other.pt"), str(tmp_path), "--out", str(tmp_path)])


def test_interrupted_train_resumes_to_the_same_checkpoint(trained, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    args = ["train", *COMMON, "--method", "rd4ad", "--backbone", "efficientnet_lite0", "--image-size", "64",
            "--steps", "40", "--checkpoint-every", "20", "--out", str(out)]
    original = dmgrd.RD4AD.training_losses
    calls = {"n": 0}

    def crash_after_25_steps(self, images, generator):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt
        return original(self, images, generator)

    monkeypatch.setattr(dmgrd.RD4AD, "training_losses", crash_after_25_steps)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert dmgrd.models.checkpoint.read_payload(out / "model.pt")["train_state"]["step"] == 20
    monkeypatch.setattr(dmgrd.RD4AD, "training_losses", original)
    assert main([*args, "--resume"]) == 0
    expected = dmgrd.models.checkpoint.read_payload(trained / "model.pt")
    resumed = dmgrd.models.checkpoint.read_payload(out / "model.pt")
    assert expected["state_dict"].keys() == resumed["state_dict"].keys()
    for name, value in expected["state_dict"].items():  # weights, memory and the thresholds
        assert torch.equal(value, resumed["state_dict"][name]), name


onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def test_export_onnx_matches_torch(trained, tmp_path):
    path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(trained / "model.pt"), "--format", "onnx", "--out", str(path)]) == 0
    model = dmgrd.load(trained / "model.pt")
    images = torch.rand(3, 3, 64, 64)  # another batch size than the export's
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {"images": images.numpy()})
    expected = model(images)
    assert np.abs(maps - expected.anomaly_map.numpy()).max() < 1e-4
    assert np.abs(scores - expected.score.numpy()).max() < 1e-4


def test_demo_trains_a_model_that_learned(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0  # the README's first command, as is
    printed = capsys.readouterr().out
    assert "anomaly_map" in printed and "pixel_aupro" in printed  # backends, then the metrics
    metrics = json.loads((tmp_path / "demo" / "test" / "metrics.json").read_text())
    assert metrics["image_auroc"] >= 0.9, metrics  # over 5 --seed values (111 and 0-3): 0.998-1.0
    page, summary = read_report(tmp_path / "demo" / "report")
    assert len(page.sections) == len(summary["images"]) == 100 and summary["metrics"] == metrics
    check_order(summary)


def test_module_entry_point_runs_info():
    result = subprocess.run([sys.executable, "-m", "dmgrd", "info"], capture_output=True, text=True, timeout=300,
                            env={**os.environ})
    assert result.returncode == 0 and "anomaly_map" in result.stdout
