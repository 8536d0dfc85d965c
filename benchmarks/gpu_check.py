"""``make gpu-check``: everything a GPU can tell in one run of under 8 minutes, with one summary at the end.

On a machine with a CUDA GPU and torch/triton preinstalled but no package registry:

1. install the pure-Python dependencies that are missing from the wheel folder ``make gpu-wheels`` filled
   (``pip install --no-index --find-links .gpu-wheels --no-deps``);
2. build and install dmgrd with ``pip install --no-build-isolation --no-deps .`` (the CUDA kernels when a
   toolkit is found);
3. the CUDA and compiled-Triton tests (``TRITON_INTERPRET=0 pytest -m "cuda or triton"``);
4. the op and model benchmarks with JSON output (``out/gpu-check/*.json``);
5. DM-GRD (WRN50, random weights, 256x256) images/s at batch 64 in bf16 after ``optimize()``, and training
   steps/s at batch 8 under bf16 autocast.

``python benchmarks/gpu_check.py [--wheels DIR] [--out DIR] [--skip-build]``; exit code 0 when every step
passed, 1 when one failed, 2 (before doing anything) without a CUDA device. ``make gpu-wheels`` runs
``pip download --no-deps`` for ``--requirements`` where a registry is reachable: the wheels match that
machine's Python and platform, so fill the folder on one like the GPU machine (same Python version).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = 2
# Installed by the GPU machine's image (their CUDA builds come from no wheel folder); never touched here.
PREINSTALLED = ("torch", "torchvision", "triton", "numpy")
BUDGET_S = 8 * 60


def wheel_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Distribution names ``make gpu-wheels`` downloads: the runtime, ``test`` and build requirements of
    pyproject.toml without version bounds and markers, except the preinstalled GPU stack."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())
    specs = [*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["test"],
             *project["build-system"]["requires"]]
    names = []
    for spec in specs:
        name = spec.split(";")[0]
        for separator in "<>=!~[ ":
            name = name.split(separator)[0]
        if name.lower() not in PREINSTALLED and name not in names:
            names.append(name)
    return names


def missing(names: list[str]) -> list[str]:
    """The distributions among ``names`` that this environment lacks."""
    absent = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(name)
    return absent


def gpu_or_reason() -> str | None:
    """None when a CUDA device is usable, else why not (in words)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"torch.cuda.is_available() is False (torch {torch.__version__}, {build})"
    return None


@dataclass
class Step:
    name: str
    ok: bool = False
    seconds: float = 0.0
    detail: str = ""
    numbers: dict = field(default_factory=dict)


def run_step(steps: list[Step], name: str, action: Callable[[Step], bool]) -> None:
    """Run ``action`` (True when it passed), recording its time and any exception."""
    step = Step(name)
    start = time.perf_counter()
    try:
        step.ok = action(step)
    except Exception as error:  # one failed step must not hide the others' results
        step.detail = f"{type(error).__name__}: {error}"
    step.seconds = time.perf_counter() - start
    steps.append(step)
    print(f"[gpu-check] {name}: {'ok' if step.ok else 'FAILED'} in {step.seconds:.0f} s {step.detail}", flush=True)


def shell(step: Step, command: list[str], timeout: float, env: dict | None = None) -> bool:
    """Run ``command`` in the repository root; its last output lines become the step's detail."""
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    lines = (result.stdout + result.stderr).strip().splitlines()
    step.detail = lines[-1] if lines else ""
    if result.returncode != 0:
        print("\n".join(lines[-30:]), file=sys.stderr)
    return result.returncode == 0


def install(step: Step, wheels: Path) -> bool:
    absent = missing(wheel_requirements())
    step.numbers["installed"] = absent
    if not absent:
        return True
    if not wheels.is_dir():
        step.detail = f"missing {absent} and no wheel folder {wheels}: run `make gpu-wheels` where pip has a registry"
        return False
    return shell(step, [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                        "--no-deps", *absent], 60)


def build(step: Step, timeout: float) -> bool:
    ok = shell(step, [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", "."],
               timeout, {"MAX_JOBS": str(os.cpu_count() or 4)})
    info = subprocess.run([sys.executable, "-c", "import dmgrd._extension as e; print(e.status().describe())"],
                          cwd="/", capture_output=True, text=True)  # from / : the installed package, not the tree
    step.numbers["extension"] = info.stdout.strip() or info.stderr.strip()[-200:]
    return ok


def pytest_json(step: Step, args: list[str], out: Path, timeout: float, env: dict | None = None) -> bool:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    if out.suffix == ".json":
        command.append(f"--benchmark-json={out}")
    else:
        command.append(f"--junitxml={out}")
    # PYTHONSAFEPATH: `-m pytest` must not put the source tree (which has no compiled extension) before the
    # installed package on sys.path.
    return shell(step, command, timeout, {"TRITON_INTERPRET": "0", "PYTHONSAFEPATH": "1", **(env or {})})


def dmgrd_throughput(step: Step) -> bool:
    """WRN50 DM-GRD at 256x256: optimised inference images/s at batch 64 in bf16, training steps/s at batch 8."""
    import torch

    import dmgrd
    from dmgrd.models.training import make_optimizer

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = dmgrd.DMGRD("wide_resnet50_2", weights=None, image_size=256, memory_size=8, texture_count=4).to(device)
    data = [{"image": torch.rand(3, 256, 256)} for _ in range(8)]
    model.train()
    model.prepare(data, torch.Generator().manual_seed(0), batch_size=8)
    images = torch.rand(8, 3, 256, 256, device=device)
    optimizer = make_optimizer(model)

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = model.training_losses(images, torch.Generator().manual_seed(1))
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    step.numbers["train_steps_per_s_batch8_bf16"] = round(1 / timed(train_step, 5), 3)
    step.numbers["train_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    model.optimize()
    batch = torch.rand(64, 3, 256, 256, device=device)

    def infer():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(batch)

    step.numbers["infer_images_per_s_batch64_bf16"] = round(64 / timed(infer, 10), 1)
    return True


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` after two warm-up calls, the device synchronised around each."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def summary(steps: list[Step]) -> str:
    lines = ["", "gpu-check summary", f"{'step':<22}{'result':<8}{'seconds':>8}  detail"]
    for step in steps:
        lines.append(f"{step.name:<22}{'ok' if step.ok else 'FAILED':<8}{step.seconds:>8.0f}  {step.detail}")
        for key, value in step.numbers.items():
            lines.append(f"{'':<38}{key} = {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gpu-check")
    parser.add_argument("--skip-build", action="store_true", help="use the installed dmgrd as it is")
    parser.add_argument("--requirements", action="store_true", help="print what `make gpu-wheels` downloads")
    args = parser.parse_args(argv)
    if args.requirements:
        print(" ".join(wheel_requirements()))
        return 0
    reason = gpu_or_reason()
    if reason is not None:
        print(f"gpu-check needs a CUDA GPU and found none: {reason}. Run it on a GPU machine (make gpu-check); "
              f"nothing was installed or run.", file=sys.stderr)
        return NO_GPU
    args.out.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    started = time.perf_counter()

    def budget(cap: float) -> float:
        """A step's timeout: ``cap`` seconds, less when the whole run would pass BUDGET_S (a minute kept for the
        in-process throughput step)."""
        return max(10.0, min(cap, BUDGET_S - 60 - (time.perf_counter() - started)))

    run_step(steps, "install wheels", lambda s: install(s, args.wheels))
    if not args.skip_build:
        run_step(steps, "build", lambda s: build(s, budget(240)))
    run_step(steps, "cuda/triton tests", lambda s: pytest_json(s, ["-m", "cuda or triton", "tests"],
                                                                args.out / "tests.xml", budget(120)))
    ops_benchmarks = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("bench_ops_*.py"))
    run_step(steps, "op benchmarks", lambda s: pytest_json(s, [*ops_benchmarks, "--benchmark-only"],
                                                            args.out / "ops.json", budget(75)))
    run_step(steps, "model benchmarks", lambda s: pytest_json(
        s, ["benchmarks/bench_models.py", "--benchmark-only"], args.out / "models.json", budget(100),
        {"DMGRD_BENCH_SIZE": "256", "DMGRD_BENCH_TRAIN_BATCH": "8", "DMGRD_BENCH_METHODS": "dmgrd,rd4ad,patchcore",
         "DMGRD_BENCH_PRESETS": "clean"}))
    run_step(steps, "dmgrd throughput", dmgrd_throughput)
    text = summary(steps) + f"\ntotal {time.perf_counter() - started:.0f} s (budget {BUDGET_S} s)"
    print(text)
    (args.out / "summary.json").write_text(json.dumps([vars(s) for s in steps], indent=1, default=str))
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
