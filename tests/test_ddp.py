"""Distributed training with the gloo backend on CPU: two ranks end with identical weights and data-built state."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dmgrd
from dmgrd.models.state import register_data_buffer


def _train_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different initial weights on purpose: rank 0's are broadcast
    model = dmgrd.DMGRD("efficientnet_lite0", weights=None, image_size=64, memory_size=3, texture_count=4,
                        ssot_points=32)
    # A data-built buffer under a name nothing else knows: the declaration alone must get rank 0's to rank 1.
    register_data_buffer(model.fusion, "calibration", torch.full((4,), float(rank + 1)))
    initial = {k: v.clone() for k, v in model.named_parameters()}
    data = [{"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i))} for i in range(8)]
    model.fit(data, steps=3, batch_size=2, progress=False)
    changed = any(not torch.equal(initial[k], v) for k, v in model.named_parameters())
    torch.save({"state": model.state_dict(), "changed": changed}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    mp.spawn(_train_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first["changed"] and second["changed"]
    for name, value in first["state"].items():
        torch.testing.assert_close(value, second["state"][name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert (first["state"]["normal_memory.indices"] >= 0).all()
    assert torch.equal(second["state"]["fusion.calibration"], torch.ones(4))


def test_torchrun_cli_trains_and_rank0_writes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "dmgrd", "train", "--dataset", "synthetic", "--method", "rd4ad", "--backbone",
               "efficientnet_lite0", "--weights", "none", "--image-size", "64", "--steps", "2", "--batch-size", "2",
               "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.pt").is_file() and (out / "config.json").is_file() and (out / "train_log.csv").is_file()
    assert dmgrd.load(out / "model.pt").method == "rd4ad"
