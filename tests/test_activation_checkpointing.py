"""Activation checkpointing (``fit(checkpoint_activations=True)``): the same losses, gradients and BatchNorm
statistics as an ordinary step, far fewer activations kept for the backward pass, and the modules restored."""

from __future__ import annotations

import pytest
import torch
from test_lean_training import TRAINED_METHODS, prepared
from torch import nn

from dmgrd.models.recompute import activation_checkpointing

# DM-GRD augments with the default probability here, so that both branches of its step are checkpointed.
OPTIONS = {
    "dmgrd": {"memory_size": 3, "texture_count": 2, "ssot_points": 16},
    "memkd": {"exemplars": 3, "memory_items": 8},
}


def _prepared(method: str):
    return prepared(method, OPTIONS.get(method))


def _step(model, images, recompute: bool) -> tuple[dict, dict, dict, int]:
    """Losses, gradients and trained buffers after one step, and the bytes autograd kept outside the
    recomputed parts."""
    model.zero_grad(set_to_none=True)
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with activation_checkpointing(model.recomputed_modules() if recompute else []):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = model.training_losses(images, torch.Generator().manual_seed(2))
        losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}
    return {k: v.detach() for k, v in losses.items()}, grads, buffers, kept


@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_a_checkpointed_step_equals_an_ordinary_one(method):
    model, images = _prepared(method)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain_losses, plain_grads, plain_buffers, plain_kept = _step(model, images, recompute=False)
    model.load_state_dict(state)
    losses, grads, buffers, kept = _step(model, images, recompute=True)
    assert model.recomputed_modules(), "every trained method names parts to recompute"
    for name in plain_losses:
        torch.testing.assert_close(losses[name], plain_losses[name], rtol=1e-6, atol=1e-7)
    assert grads.keys() == plain_grads.keys()
    for name in grads:  # the recomputation repeats the same kernels on the same inputs: bitwise equal on this CPU
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)
    # Each BatchNorm updated its statistics exactly once, as in the ordinary step (twice would move them further).
    assert buffers.keys() == plain_buffers.keys() and buffers
    for name in buffers:
        torch.testing.assert_close(buffers[name], plain_buffers[name], rtol=0, atol=0)
    # Measured at 64x64 with resnet18: what stays kept is 2-10 % of the ordinary step's saved bytes (RD++: 31 %,
    # its projections are not recomputed).
    assert kept < 0.5 * plain_kept, (kept, plain_kept)


def test_fit_with_checkpointing_trains_to_the_same_model():
    histories, states = [], []
    for recompute in (False, True):
        model, images = _prepared("rd4ad")
        data = [{"image": image} for image in images]
        histories.append(model.fit(data, steps=2, batch_size=2, progress=False, checkpoint_activations=recompute))
        states.append(model.state_dict())
        assert all("forward" not in m.__dict__ for m in model.modules()), "fit restores every forward"
    for plain, recomputed in zip(*histories, strict=True):
        assert plain["loss"] == pytest.approx(recomputed["loss"], rel=1e-6)
    for name, value in states[0].items():  # equal_nan: the unset decision thresholds are NaN
        torch.testing.assert_close(states[1][name], value, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_eval_mode_and_no_grad_run_the_plain_forward():
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.rand(2, 3, 8, 8)
    with activation_checkpointing([block]):
        block.eval()
        with torch.no_grad():
            plain = block(x)
        block.train()
        trained = block(x.requires_grad_())
        trained.sum().backward()
    assert "forward" not in block.__dict__
    assert block[1].num_batches_tracked.item() == 1  # the recomputation in backward did not count again
    assert plain.shape == trained.shape and not torch.allclose(plain, trained)


def test_nesting_the_same_module_is_refused():
    block = nn.Linear(2, 2)
    with (activation_checkpointing([block]), pytest.raises(RuntimeError, match="already under activation"),
          activation_checkpointing([block])):
        pass
