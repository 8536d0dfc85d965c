"""The HTML test report, read back with the standard library's HTML parser: every referenced file exists, every
test image appears once, in the documented order, and the page agrees with report.json."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmgrd import report, visualize
from dmgrd.engine import Results, category_metrics
from dmgrd.metrics import compute_metrics


class ReportPage(HTMLParser):
    """What a reader sees: the metrics table, every image source, and the image sections in page order."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, dict[str, float]] = {}  # table id -> metric -> value
        self.sources: list[str] = []
        self.sections: list[dict[str, str]] = []
        self.section_sources: list[list[str]] = []
        self._table: str | None = None
        self._cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs["id"]
            self.tables[self._table] = {}
        elif tag == "td" and self._table:
            self._in_cell = True
            self._cells.append("")
        elif tag == "section":
            self.sections.append(attrs)
            self.section_sources.append([])
        elif tag == "img":
            self.sources.append(attrs["src"])
            if self.sections:
                self.section_sources[-1].append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False
        elif tag == "tr" and self._cells:
            name, value = self._cells
            self.tables[self._table][name] = float(value)
            self._cells = []
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._in_cell:
            self._cells[-1] += data


def read_report(folder: Path) -> tuple[ReportPage, dict]:
    page = ReportPage()
    page.feed((folder / "index.html").read_text())
    return page, json.loads((folder / "report.json").read_text())


def check_report(folder: Path, results: Results) -> tuple[ReportPage, dict]:
    """The structural checks every report must pass; returns the parsed page and JSON for more."""
    page, data = read_report(folder)
    assert page.sources, "the page shows no image"
    for source in page.sources:  # relative, inside the folder, and there
        assert not Path(source).is_absolute() and ".." not in Path(source).parts and "://" not in source, source
        assert (folder / source).is_file(), source
    assert {"roc.png", "pro.png"} <= set(page.sources)
    indices = [int(s["data-index"]) for s in page.sections]
    assert sorted(indices) == list(range(len(results.paths)))  # every test image exactly once
    assert [e["index"] for e in data["images"]] == indices  # the JSON in page order
    assert sorted(e["path"] for e in data["images"]) == sorted(results.paths)
    for section, entry, sources in zip(page.sections, data["images"], page.section_sources, strict=True):
        assert float(section["data-score"]) == entry["score"] == pytest.approx(float(results.scores[entry["index"]]))
        assert int(section["data-label"]) == entry["label"] == int(results.labels[entry["index"]])
        assert section["data-outcome"] == entry["outcome"]
        assert sources == [entry["files"][tile] for tile in report.TILES]
    shown = {"metrics": data["metrics"], **{f"metrics-{c}": m for c, m in data["category_metrics"].items()}}
    assert page.tables.keys() == shown.keys()
    for table, values in shown.items():
        assert page.tables[table].keys() == values.keys()
        for name, value in values.items():
            assert abs(page.tables[table][name] - value) <= 5e-7, (table, name)
    check_order(data)
    return page, data


def check_order(data: dict) -> None:
    """The documented order: mistakes by decreasing distance from the image threshold, then correct by score."""
    entries = data["images"]
    wrong = [e["outcome"] in ("FN", "FP") for e in entries]
    assert wrong == sorted(wrong, reverse=True), "a correct decision comes before a mistake"
    for e in entries:
        own = data["category_thresholds"].get(e["category"], data["thresholds"])
        assert e["image_threshold"] == own["image"] and e["pixel_threshold"] == own["pixel"]
        assert e["decision"] == int(e["score"] > e["image_threshold"])
        assert e["outcome"] == report.outcome(e["label"], e["decision"])
    mistakes = [abs(e["score"] - e["image_threshold"]) for e, w in zip(entries, wrong, strict=True) if w]
    correct = [e["score"] for e, w in zip(entries, wrong, strict=True) if not w]
    assert mistakes == sorted(mistakes, reverse=True) and correct == sorted(correct, reverse=True)


def made_up_results(size=(24, 16)) -> tuple[Results, list[dict]]:
    """Eight images with known scores: two false negatives, one false positive at threshold 0.5."""
    scores = torch.tensor([0.9, 0.1, 0.45, 0.6, 0.2, 0.3, 0.8, 0.05])
    labels = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, 1, *size)
    masks[labels == 1, :, 4:10, 3:9] = 1
    maps = torch.rand(8, 1, *size, generator=g) * 0.4 + masks * scores.view(8, 1, 1, 1)
    images = [{"image": torch.rand(3, *size, generator=g)} for _ in range(8)]
    return Results(scores, labels, maps, masks, [f"part/{i}.png" for i in range(8)]), images


def test_report_structure_order_and_tiles(tmp_path):
    results, images = made_up_results()
    metrics = compute_metrics(results.scores, results.labels, results.maps, results.masks)
    thresholds = {"image": 0.5, "pixel": 0.42}
    entries = report.write_report(tmp_path, results, images, thresholds, metrics)
    _, data = check_report(tmp_path, results)
    # 2 (0.45: 0.05 below) and 5 (0.3: 0.2 below) are missed, 3 (0.6: 0.1 above) is a false alarm
    assert [e.index for e in entries] == [5, 3, 2, 0, 6, 4, 1, 7] == [e["index"] for e in data["images"]]
    assert [e.outcome for e in entries[:4]] == ["FN", "FP", "FN", "TP"]
    first = entries[0].files
    predicted = np.asarray(Image.open(tmp_path / first["predicted"]))
    assert predicted.shape == (24, 16, 3)  # full resolution
    assert np.array_equal(predicted[..., 0] == 255, (results.maps[5, 0] > 0.42).numpy())
    truth = np.asarray(Image.open(tmp_path / first["truth"]))
    assert np.array_equal(truth[..., 0] == 255, results.masks[5, 0].bool().numpy())
    image = np.asarray(Image.open(tmp_path / first["image"]))
    assert np.abs(image / 255 - images[5]["image"].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    assert data["thresholds"] == thresholds and "order" in data
    low = data["overlay_scale_low"]  # the documented colour scale, centred on the pixel threshold
    assert low == min(float(results.maps.flatten().quantile(0.01)), 0.42)
    expected = visualize.overlay(images[5]["image"], results.maps[5], low, 2 * 0.42 - low)
    assert np.array_equal(np.asarray(Image.open(tmp_path / first["overlay"])), expected)


def test_report_needs_thresholds(tmp_path):
    results, images = made_up_results()
    with pytest.raises(ValueError, match="thresholds"):
        report.write_report(tmp_path, results, images, None, {})


def test_report_judges_each_category_by_its_own_thresholds(tmp_path):
    results, images = made_up_results()
    results.categories = ["a"] * 4 + ["b"] * 4
    metrics = compute_metrics(results.scores, results.labels, results.maps, results.masks)
    by_category = {"a": {"image": 0.5, "pixel": 0.42}, "b": {"image": 0.25, "pixel": 0.3}}
    per_category = category_metrics(results)
    entries = report.write_report(tmp_path, results, images, {"image": 0.5, "pixel": 0.42}, metrics,
                                  category_thresholds=by_category, category_metrics=per_category)
    page, data = check_report(tmp_path, results)
    assert set(page.tables) == {"metrics", "metrics-a", "metrics-b"} and data["category_thresholds"] == by_category
    # a (image threshold 0.5): 2 missed (0.05 below), 3 a false alarm (0.1 above); b (0.25): 5 caught at 0.3
    outcomes = {e.index: e.outcome for e in entries}
    assert outcomes == {0: "TP", 1: "TN", 2: "FN", 3: "FP", 4: "TN", 5: "TP", 6: "TP", 7: "TN"}
    assert [e.index for e in entries] == [3, 2, 0, 6, 5, 4, 1, 7]
    assert [e.category for e in entries[:4]] == ["a", "a", "a", "b"]
