"""The test report: a folder with ``index.html`` (metrics table, ROC and PRO curves, one labelled panel per test
image), ``report.json`` (the same data) and the PNGs the page shows. The page uses nothing outside the folder.

Each panel shows, at the model's full resolution: the image, the anomaly map over it (one colour scale for all
images, from the 1 % quantile of all map values up to as far above the pixel threshold, so the threshold is the
middle of the scale: green in "jet"), the predicted mask (map > pixel threshold)
and the ground truth, with the image's score, label and decision (score > image threshold). After unified
training over several categories each image is judged by its category's thresholds, and the metrics are given
per category too.

Panels come in :data:`ORDER`: the mistakes first, the worst first, then the correct decisions.
"""

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmgrd import visualize
from dmgrd.engine import Results

ORDER = ("mistakes first (false negatives and false positives), the farthest from the image threshold first; "
         "then the correct decisions, by descending score")
TILES = ("image", "overlay", "predicted", "truth")
CAPTIONS = {"image": "image", "overlay": "anomaly map over the image", "predicted": "predicted mask (map > {pixel})",
            "truth": "ground truth"}
MIN_SHOWN = 192  # pixels: smaller tiles are shown enlarged by a whole factor (the files keep the full resolution)
STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #bbb;
padding:2px 8px;text-align:right}section{margin:1em 0;padding:.5em;border-left:6px solid #4a4}
section.FN,section.FP{border-color:#d33}figure{display:inline-block;margin:0 .5em 0 0}
img.tile{image-rendering:pixelated}figcaption{font-size:80%;text-align:center}"""


@dataclass(frozen=True)
class Entry:
    """One test image of the report, in page order (``rank`` from 1)."""

    rank: int
    index: int  # in the data set / results
    path: str
    category: str | None
    label: int
    score: float
    image_threshold: float
    pixel_threshold: float
    decision: int  # 1: score > image threshold
    outcome: str  # TP, TN, FP or FN
    files: dict[str, str]  # tile -> file name relative to the report folder


def outcome(label: int, decision: int) -> str:
    """``"TP"``, ``"TN"``, ``"FP"`` or ``"FN"`` of a true ``label`` and a ``decision`` (1: anomalous)."""
    return ("T" if label == decision else "F") + ("P" if decision else "N")


def report_order(scores: np.ndarray, labels: np.ndarray, image_thresholds: np.ndarray | float) -> list[int]:
    """Indices in :data:`ORDER`: mistakes by descending ``|score - threshold|`` (a threshold per image, or one for
    all), then the rest by descending score (ties in index order)."""
    margin = scores - image_thresholds
    wrong = (margin > 0).astype(int) != labels
    mistakes = sorted(np.flatnonzero(wrong).tolist(), key=lambda i: -abs(margin[i]))
    correct = sorted(np.flatnonzero(~wrong).tolist(), key=lambda i: -scores[i])
    return mistakes + correct


def write_report(out: str | Path, results: Results, data: Any, thresholds: dict[str, float] | None,
                 metrics: dict[str, float], title: str = "dmgrd test report",
                 category_thresholds: dict[str, dict[str, float]] | None = None,
                 category_metrics: dict[str, dict[str, float]] | None = None) -> list[Entry]:
    """Write the report of ``results`` (from :func:`dmgrd.engine.predict` over ``data``, whose item ``i``
    holds image ``i``) into ``out``; ``thresholds`` are the model's (``{"image": .., "pixel": ..}``) and
    ``metrics`` those of :func:`dmgrd.metrics.compute_metrics`. With categories in the results, an image is
    judged by its category's entry of ``category_thresholds`` where there is one, and ``category_metrics``
    (:func:`dmgrd.engine.category_metrics`) get a table each. Returns the entries in page order."""
    if not thresholds or not {"image", "pixel"} <= set(thresholds):
        raise ValueError("the report needs the model's image and pixel thresholds (a checkpoint trained with "
                         "--val-fraction 0 has none)")
    out = Path(out)
    scores, labels = results.scores.numpy().astype(np.float64), results.labels.numpy().astype(int)
    categories: list[str | None] = list(results.categories) or [None] * len(scores)
    judged = [(category_thresholds or {}).get(c, thresholds) if c else thresholds for c in categories]
    image_thresholds = np.array([t["image"] for t in judged])
    visualize.save_roc_plot(labels, scores, out / "roc.png", title="image ROC")
    visualize.save_pro_plot(results.maps, results.masks, out / "pro.png", title="per-region overlap")
    low = min(visualize.map_range(results.maps)[0], *[t["pixel"] for t in judged])  # the overlays' blue
    entries = []
    for rank, i in enumerate(report_order(scores, labels, image_thresholds), 1):
        pixel_threshold = judged[i]["pixel"]
        files = _write_tiles(out, i, data[i]["image"], results.maps[i], results.masks[i], pixel_threshold, low)
        decision = int(scores[i] > image_thresholds[i])
        entries.append(Entry(rank, i, results.paths[i], categories[i], int(labels[i]), float(scores[i]),
                             float(image_thresholds[i]), pixel_threshold, decision, outcome(int(labels[i]), decision),
                             files))
    summary = {"title": title, "order": ORDER, "thresholds": thresholds, "metrics": metrics,
               "category_thresholds": category_thresholds or {}, "category_metrics": category_metrics or {},
               "overlay_scale_low": low,
               "curves": {"roc": "roc.png", "pro": "pro.png"}, "images": [asdict(e) for e in entries]}
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    (out / "index.html").write_text(_page(summary, entries, results.maps.shape[-2], results.maps.shape[-1]))
    return entries


def _write_tiles(out: Path, index: int, image, anomaly_map, mask, pixel_threshold: float,
                 low: float) -> dict[str, str]:
    tiles = {"image": visualize.to_uint8_image(image),
             "overlay": visualize.overlay(image, anomaly_map, low, 2 * pixel_threshold - low),
             "predicted": visualize.mask_image(anomaly_map > pixel_threshold),
             "truth": visualize.mask_image(mask)}
    files = {}
    for name, array in tiles.items():
        files[name] = f"images/{index:05d}_{name}.png"
        visualize.save_png(array, out / files[name])
    return files


def _page(summary: dict, entries: list[Entry], tile_height: int, tile_width: int) -> str:
    """The HTML of the report; every value shown comes from ``summary``."""
    esc = html.escape
    zoom = max(1, -(-MIN_SHOWN // tile_width))
    height, width = tile_height * zoom, tile_width * zoom
    thresholds = summary["thresholds"]
    lines = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(summary['title'])}</title>",
             f"<style>{STYLE}</style></head><body><h1>{esc(summary['title'])}</h1>",
             f"<p>Image threshold {thresholds['image']:.6f}, pixel threshold {thresholds['pixel']:.6f} (chosen on "
             "held-out normal images, stored in the checkpoint). The same data: <a href='report.json'>report.json"
             "</a>.</p>", "<h2>Metrics</h2>", _table("metrics", summary["metrics"])]
    for category, values in summary["category_metrics"].items():
        own = summary["category_thresholds"].get(category, thresholds)
        lines += [f"<h3>{esc(category)}</h3><p>image threshold {own['image']:.6f}, pixel threshold "
                  f"{own['pixel']:.6f}</p>", _table(f"metrics-{category}", values)]
    lines += ["<h2>Curves</h2><img id='roc' src='roc.png' alt='image ROC curve'> "
             "<img id='pro' src='pro.png' alt='per-region overlap curve'>",
             f"<h2>Test images</h2><p id='order'>Order: {esc(ORDER)}.</p>",
             f"<p>Overlay colours: blue at {summary['overlay_scale_low']:.4g}, green at the image's pixel "
             "threshold, red as far above it.</p>"]
    for e in entries:
        kind = "anomalous" if e.label else "normal"
        decided = "anomalous" if e.decision else "normal"
        category = f"{esc(e.category)}: " if e.category else ""
        lines.append(f"<section class='{e.outcome}' id='image-{e.index}' data-index='{e.index}' "
                     f"data-score='{e.score!r}' data-label='{e.label}' data-outcome='{e.outcome}'>"
                     f"<h3>{e.rank}. {e.outcome}: {category}{esc(e.path)}</h3><p>score {e.score:.6f} (image "
                     f"threshold {e.image_threshold:.6f}), label {kind}, decision {decided}</p>")
        for tile in TILES:
            caption = CAPTIONS[tile].format(pixel=f"{e.pixel_threshold:.4g}")
            lines.append(f"<figure><img class='tile' src='{e.files[tile]}' width='{width}' height='{height}' "
                         f"alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>")
        lines.append("</section>")
    lines.append("</body></html>\n")
    return "\n".join(lines)


def _table(name: str, metrics: dict[str, float]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6f}</td></tr>" for k, v in metrics.items())
    return f"<table id='{html.escape(name)}'><tr><th>metric</th><th>value</th></tr>{rows}</table>"
