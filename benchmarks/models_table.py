"""Print the table of ``bench_models.py`` results from its pytest-benchmark JSON file.

    python benchmarks/models_table.py .benchmarks/models.json
"""

from __future__ import annotations

import json
import re
import sys

STAGES = ("teacher", "synthesis", "memory", "fusion", "student", "other", "backward", "optimizer")


def rows(report: dict) -> list[list[str]]:
    """One row per model benchmark: case, mode, batch, images/s (and at batch 1), ms per stage, GFLOP/s, memory."""
    table = []
    for bench in report["benchmarks"]:
        if not bench["name"].startswith("test_model["):  # the op benchmarks of a `make bench` report
            continue
        info = bench["extra_info"]
        case = re.sub(r"^test_model\[|-(plain|optimized|train-recompute|train|compiled)\]$", "", bench["name"])
        stages = info.get("stages", {})
        total_ms = sum(s["ms"] for s in stages.values())
        achieved = sum(s["GFLOP"] for s in stages.values()) / total_ms * 1e3 if total_ms else 0.0
        mode = info.get("mode", "")
        if "compile_warmup_s" in info:
            mode += f" ({info['compile_warmup_s']:.0f} s warm-up)"
        table.append([case, mode, str(info.get("batch", "")), f"{info.get('images_per_s', 0):.1f}",
                      f"{info['images_per_s_batch1']:.1f}" if "images_per_s_batch1" in info else "",
                      *(f"{stages[s]['ms']:.0f}" if s in stages else "" for s in STAGES),
                      f"{info.get('GFLOP_total', 0):.2f}", f"{achieved:.1f}",
                      str(info.get("peak_memory_MB", ""))])
    return table


def main(path: str) -> None:
    with open(path) as f:
        report = json.load(f)
    header = ["case", "mode", "batch", "img/s", "img/s b1", *(f"{s} ms" for s in STAGES), "GFLOP", "GFLOP/s",
              "peak MB"]
    body = rows(report)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *body]:
        cells = zip(line, widths, strict=True)
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(cells)))
    gemm = {b["extra_info"].get("gemm_fp32_GFLOP_per_s") for b in report["benchmarks"]} - {None}
    print(f"\nfp32 GEMM rate of this machine (torch.mm 2048^3): {', '.join(f'{g:.1f}' for g in gemm)} GFLOP/s; "
          f"'other' is the anomaly map and score (training: the losses)")


if __name__ == "__main__":
    main(sys.argv[1])
