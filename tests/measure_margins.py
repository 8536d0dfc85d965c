"""How much of each tolerance the tests use, over seeds (a script, not a test).

Runs pytest on the given test files once per seed (``DMGRD_TEST_SEED=0..N-1``) with ``DMGRD_MARGINS`` set, so
every ``record_margin`` call (tests/conftest.py) is kept, and prints per test (parameters kept, seed dropped)
and label the largest observed / allowed ratio over the seeds, the seed that gave it and the number of failed
runs; then the largest ratio per file and label. A ratio near 1 means the tolerance is nearly used up::

    TRITON_INTERPRET=1 python tests/measure_margins.py --seeds 20 tests/test_ops_*.py
    TRITON_INTERPRET=1 python tests/measure_margins.py --seeds 20 -k "not fuzz" tests/test_ops_coreset.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def run_seed(seed: int, files: list[str], keyword: str | None, record: Path) -> set[str]:
    """Runs pytest at ``seed``, appending its margins to ``record``; returns the nodeids that failed or erred."""
    env = {**os.environ, "DMGRD_TEST_SEED": str(seed), "DMGRD_MARGINS": str(record)}
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-rfE"]
    if keyword:
        command += ["-k", keyword]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode not in (0, 1):  # 1: some tests failed; anything else: pytest itself did not run
        sys.exit(f"pytest exited with {result.returncode} at seed {seed}:\n{result.stdout[-3000:]}{result.stderr}")
    failed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))}
    print(f"seed {seed}: {len(failed)} failed", file=sys.stderr, flush=True)
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="test files (or node ids) to run")
    parser.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1 (default 20)")
    parser.add_argument("-k", dest="keyword", help="a pytest -k expression, say 'not fuzz'")
    args = parser.parse_args()
    failures: dict[str, int] = defaultdict(int)
    worst: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            record = Path(tmp) / f"seed{seed}.jsonl"
            for nodeid in run_seed(seed, args.files, args.keyword, record):
                failures[nodeid] += 1
            for line in record.read_text().splitlines() if record.exists() else []:
                entry = json.loads(line)
                key = (entry["test"], entry["label"])
                if key not in worst or not entry["ratio"] <= worst[key]["ratio"]:  # NaN is the worst
                    worst[key] = entry
    print(f"{'ratio':>9}  {'seed':>10}  {'failed':>6}  test [label]")
    for (test, label), entry in sorted(worst.items()):
        print(f"{entry['ratio']:9.3g}  {entry['seed']!s:>10}  {failures.get(test, 0):6d}  {test} [{label}]")
    for test in sorted(set(failures) - {test for test, _ in worst}):
        print(f"{'-':>9}  {'-':>10}  {failures[test]:6d}  {test}")
    per_file: dict[tuple[str, str], float] = {}
    for (test, label), entry in worst.items():
        key = (test.split("::")[0], label)
        if key not in per_file or not entry["ratio"] <= per_file[key]:
            per_file[key] = entry["ratio"]
    print(f"\nlargest ratio per file and label over {args.seeds} seeds; {sum(failures.values())} failed runs")
    for (file, label), ratio in sorted(per_file.items()):
        print(f"{ratio:9.3g}  {file} [{label}]")


if __name__ == "__main__":
    main()
