"""Accuracy benchmarks: a grid of data sets x methods x variants (presets and config overrides) x seeds, run cell
by cell, resumably, each cell in its own process (so its peak memory is its own).

Every finished cell appends one JSON line to ``results.jsonl`` (metrics, training wall-clock and processor
time, inference images/s, peak memory) and its curves to ``curves/``; a rerun skips the cells already there, so a
killed grid continues where it stopped (a cell cut off mid-way runs again from its start, to the same result:
training is deterministic per seed). After each cell ``results.csv``, ``summary.md`` (mean ± std over seeds) and
the plots (``metrics_<data>.png``: bars with error bars; ``curves_<data>.png``: image ROC and PRO of the first
seed) are rewritten from all results so far.
"""

import csv
import json
import math
import multiprocessing
import resource
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dmgrd import data, engine, metrics, models

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "pixel_f1max")
# Training wall-clock and processor time (all threads: with one thread, what the training costs on a core of its
# own however busy the machine is), inference images/s, peak memory.
COSTS = ("train_seconds", "train_cpu_seconds", "images_per_second", "peak_memory_mb")
CURVE_POINTS = 200  # points kept of each curve (evenly in FPR)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a method (preset plus overrides) trained with one seed on one data set."""

    data: str
    method: str
    variant: str
    seed: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{data_name(self.data)}/{self.method}/{self.variant}/seed{self.seed}"


def data_name(spec: str) -> str:
    """A short name of a data set spec: the category folder's name, or ``synthetic-<category>``."""
    return spec.replace(":", "-") if spec.startswith("synthetic:") else Path(spec).name


def open_data(spec: str, split: str, image_size: int | tuple[int, int], seed: int) -> Any:
    """``"synthetic:<category>"`` (the built-in data) or the path of a category folder in the MVTec AD layout."""
    if spec.startswith("synthetic:"):
        return data.Synthetic(split, spec.split(":", 1)[1], image_size=image_size, seed=seed)
    folder = Path(spec)
    return data.MVTecAD(folder.parent, folder.name, split, image_size=image_size)


def grid(datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
         variants: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
    """Every cell of data sets x methods x variants x seeds. A variant is a name and config options (its
    ``preset`` among them, default ``"clean"``); without variants, one ``"clean"`` variant. Every method's
    config is built from every variant first, so a preset or option a method lacks fails before any cell runs."""
    variants = variants or {"clean": {}}
    unknown = sorted(set(methods) - set(models.METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(models.METHODS)}")
    for method in methods:
        for name, options in variants.items():
            config_options = dict(options)
            try:
                models.METHODS[method].config_class.from_preset(config_options.pop("preset", "clean"),
                                                                **config_options)
            except (TypeError, ValueError) as error:
                raise ValueError(f"variant {name!r} does not fit {method}: {error}") from None
    return [Cell(d, m, name, s, dict(options)) for d in datasets for m in methods
            for name, options in variants.items() for s in seeds]


@dataclass(frozen=True)
class Budget:
    """What every cell gets: teacher, input size, training steps and batch size, device."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    image_size: int | tuple[int, int] = 256
    steps: int = 300
    batch_size: int = 8
    device: str = "cpu"


def run_cell(cell: Cell, budget: Budget, curves_dir: Path) -> dict[str, Any]:
    """Train and evaluate one cell in this process; its result row (the curves go to ``curves_dir``)."""
    torch.manual_seed(cell.seed)
    options = {"preset": "clean", **cell.options}
    model = models.METHODS[cell.method](budget.backbone, weights=budget.weights, image_size=budget.image_size,
                                        seed=cell.seed, **options).to(budget.device)
    train = open_data(cell.data, "train", budget.image_size, cell.seed)
    test = open_data(cell.data, "test", budget.image_size, cell.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.fit(train, steps=budget.steps, batch_size=budget.batch_size, progress=False)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    start = time.perf_counter()
    results = engine.predict(model, test, batch_size=budget.batch_size, progress=False)
    if budget.device.startswith("cuda"):
        torch.cuda.synchronize()
    infer_seconds = time.perf_counter() - start
    row = {**asdict(cell), "key": cell.key, "data": data_name(cell.data),
           **metrics.compute_metrics(results.scores, results.labels, results.maps, results.masks),
           "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
           "images_per_second": len(test) / infer_seconds,
           "peak_memory_mb": _peak_memory_mb(budget.device), **asdict(budget)}
    _write_curves(results, curves_dir / f"{cell.key.replace('/', '_')}.json")
    return row


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def _write_curves(results: engine.Results, path: Path) -> None:
    """The image ROC and the PRO curve of a cell, each resampled to CURVE_POINTS points."""
    fpr, tpr = metrics.roc_curve(results.scores, results.labels)
    pro_fpr, pro = metrics.pro_curve(results.maps, results.masks)
    grid_fpr = np.linspace(0, 1, CURVE_POINTS)
    curves = {"roc": [grid_fpr.tolist(), np.interp(grid_fpr, fpr, tpr).tolist()],
              "pro": [grid_fpr.tolist(), np.interp(grid_fpr, pro_fpr, pro).tolist()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(curves))


def _child(cell: Cell, budget: Budget, curves_dir: Path, queue: Any) -> None:
    try:
        queue.put(("ok", run_cell(cell, budget, curves_dir)))
    except BaseException as error:  # reported to the parent, which raises it
        queue.put(("error", f"{type(error).__name__}: {error}"))


def run_isolated(cell: Cell, budget: Budget, curves_dir: Path) -> dict[str, Any]:
    """:func:`run_cell` in a fresh process; its errors are raised here."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(cell, budget, curves_dir, queue))
    process.start()
    status, value = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark cell {cell.key} failed: {value}")
    return value


def read_results(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out/results.jsonl`` (none when it does not exist)."""
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def benchmark(datasets: Sequence[str], methods: Sequence[str], out: str | Path, seeds: Sequence[int] = (0,),
              variants: dict[str, dict[str, Any]] | None = None, budget: Budget | None = None, progress: bool = True,
              isolate: bool = True) -> list[dict[str, Any]]:
    """Run the :func:`grid` of ``datasets`` (``"synthetic:<category>"`` or MVTec-layout category folders) x
    ``methods`` x ``variants`` x ``seeds`` under ``budget``, into ``out``; return all result rows.

    Cells already in ``out/results.jsonl`` are skipped; each other cell runs in its own process (unless
    ``isolate=False``) and the reports are rewritten after each. See the module docstring for the files."""
    return run_grid(grid(datasets, methods, seeds, variants), out, budget, progress, isolate)


def run_grid(cells: Iterable[Cell], out: str | Path, budget: Budget | None = None, progress: bool = True,
             isolate: bool = True) -> list[dict[str, Any]]:
    """Run the cells not yet in ``out/results.jsonl``, then rewrite the reports; return all result rows."""
    out, budget = Path(out), budget or Budget()
    out.mkdir(parents=True, exist_ok=True)
    cells = list(cells)
    done = {row["key"] for row in read_results(out)}
    todo = [cell for cell in cells if cell.key not in done]
    for cell in tqdm(todo, desc="benchmark", disable=not progress, dynamic_ncols=True):
        row = (run_isolated if isolate else run_cell)(cell, budget, out / "curves")
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        write_reports(out)
    write_reports(out)
    return read_results(out)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (data, method, variant): the mean and standard deviation over seeds of every metric and cost."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["data"], row["method"], row["variant"]), []).append(row)
    summary = []
    for (data_set, method, variant), group in groups.items():
        entry: dict[str, Any] = {"data": data_set, "method": method, "variant": variant, "seeds": len(group)}
        for name in (*METRICS, *COSTS):
            values = [float(r.get(name, math.nan)) for r in group]
            if any(math.isnan(v) for v in values):  # rows written by older versions lack some costs
                entry[name] = entry[name + "_std"] = math.nan
                continue
            entry[name] = statistics.fmean(values)
            entry[name + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def write_reports(out: Path) -> None:
    """``results.csv``, ``summary.md`` and the plots of everything in ``out/results.jsonl``."""
    rows = read_results(out)
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row if k != "options"))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    (out / "summary.md").write_text(markdown_table(summary))
    for data_set in dict.fromkeys(entry["data"] for entry in summary):
        entries = [e for e in summary if e["data"] == data_set]
        _plot_metrics(entries, out / f"metrics_{data_set}.png")
        _plot_curves([r for r in rows if r["data"] == data_set], out, out / f"curves_{data_set}.png")


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a markdown table: mean ± std over the seeds."""
    lines = ["| data | method | variant | seeds | image AUROC | pixel AUROC | AUPRO@0.3 | image F1-max | "
             "pixel F1-max | train s | train CPU s | images/s | peak MB |", "|" + "---|" * 13]
    for e in summary:
        cells = [f"{e[m]:.4f} ± {e[m + '_std']:.4f}" for m in METRICS]
        costs = [_number(e[name], digits) for name, digits in zip(COSTS, (0, 0, 1, 0), strict=True)]
        lines.append(f"| {e['data']} | {e['method']} | {e['variant']} | {e['seeds']} | " + " | ".join(cells + costs)
                     + " |")
    return "\n".join(lines) + "\n"


def _number(value: float, digits: int) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _plot_metrics(entries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{e['method']}\n{e['variant']}" for e in entries]
    shown = METRICS[:3]
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(entries)), 4))
    for i, name in enumerate(shown):
        x = np.arange(len(entries)) + (i - (len(shown) - 1) / 2) * width
        ax.bar(x, [e[name] for e in entries], width, yerr=[e[name + "_std"] for e in entries], capsize=3,
               label=name.replace("_", " "))
    ax.set_xticks(np.arange(len(entries)), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{entries[0]['data']}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(rows: list[dict[str, Any]], out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        first.setdefault((row["method"], row["variant"]), row)
    fig, (roc_ax, pro_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for (method, variant), row in first.items():
        curve_file = out / "curves" / f"{row['key'].replace('/', '_')}.json"
        if not curve_file.is_file():
            continue
        curves = json.loads(curve_file.read_text())
        roc_ax.plot(*curves["roc"], label=f"{method} {variant}")
        pro_ax.plot(*curves["pro"], label=f"{method} {variant}")
    roc_ax.set(xlabel="FPR", ylabel="TPR", title="image ROC (first seed)")
    pro_ax.set(xlabel="FPR", ylabel="PRO", title="per-region overlap (first seed)", xlim=(0, 0.3))
    roc_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` (values read as JSON where they parse, else as strings); a comma inside a
    JSON list, object or string belongs to the value (``"lines:anomaly_shapes=["blobs","lines"],seed=1"``)."""
    name, _, assignments = text.partition(":")
    if not name:
        raise ValueError(f"a variant needs a name: {text!r}")
    options: dict[str, Any] = {}
    for item in filter(None, _top_level_split(assignments)):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {name!r}: {item!r} is not key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def _top_level_split(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, braces and double quotes."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, char in enumerate(text):
        if char == '"' and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and char in "[{":
            depth += 1
        elif not quoted and char in "]}":
            depth -= 1
        elif not quoted and depth == 0 and char == ",":
            parts.append(text[start:i])
            start = i + 1
    if depth or quoted:
        raise ValueError(f"unbalanced brackets or quotes in variant options {text!r}")
    return [*parts, text[start:]]
