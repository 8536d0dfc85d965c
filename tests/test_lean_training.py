"""Lean training steps: the frozen teacher runs once per batch (clean and synthesised images together), builds
no autograd graph, and one pass over a concatenated batch equals separate passes."""

from __future__ import annotations

import pytest
import torch

from dmgrd.models.base import METHODS
from dmgrd.models.teacher import Teacher, split_batch

SIZE = 64
OPTIONS = {
    "dmgrd": {"memory_size": 3, "texture_count": 2, "anomaly_prob": 1.0, "ssot_points": 16},  # every image augmented
    "memkd": {"exemplars": 3, "memory_items": 8},
}


TRAINED_METHODS = ["dmgrd", "drd", "rdpp", "rd4ad", "memkd"]


def prepared(method: str, options: dict | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """A resnet18 model of ``method`` in train mode with its memory built from 4 random images, and the images."""
    torch.manual_seed(0)
    model = METHODS[method]("resnet18", weights=None, image_size=SIZE, **(options or {}))
    gen = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(3, SIZE, SIZE, generator=gen)} for _ in range(4)]
    model.train()
    model.prepare(data, torch.Generator().manual_seed(1), batch_size=2)
    return model, torch.stack([d["image"] for d in data])


@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_the_teacher_runs_once_per_training_step_without_a_graph(method):
    model, images = prepared(method, OPTIONS.get(method))
    calls = []
    model.teacher.register_forward_hook(lambda module, args, out: calls.append((args[0].shape[0], out)))
    images = images[:2]
    losses = model.training_losses(images, torch.Generator().manual_seed(2))
    assert len(calls) == 1
    batch, feats = calls[0]
    expected_batch = {"dmgrd": 4, "drd": 4, "rdpp": 4}.get(method, 2)  # DM-GRD: inputs + their clean originals
    assert batch == expected_batch
    assert not any(f.requires_grad for f in feats)
    losses["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_one_pass_over_two_batches_equals_two_passes(backbone):
    """The precondition of concatenating: the eval-mode teacher treats every sample on its own."""
    teacher = Teacher(backbone, None)
    gen = torch.Generator().manual_seed(3)
    first, second = torch.rand(3, 3, SIZE, SIZE, generator=gen), torch.rand(2, 3, SIZE, SIZE, generator=gen)
    joint_first, joint_second = split_batch(teacher(torch.cat([first, second])), 3)
    for joint, separate in ((joint_first, teacher(first)), (joint_second, teacher(second))):
        for a, b in zip(joint, separate, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # bitwise equal on this CPU
