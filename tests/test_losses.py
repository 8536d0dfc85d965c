"""Loss functions and the learning-rate schedule against their definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmgrd.losses import contrast_loss, sinkhorn_divergence, ssot_loss, triplet_loss
from dmgrd.models.training import warmup_cosine


def test_sinkhorn_divergence_properties(gen):
    x = torch.randn(3, 40, 5, generator=gen)
    assert sinkhorn_divergence(x, x).abs().max() < 1e-5  # over 50 seeds: exactly 0
    shift = torch.tensor([0.5, -1.0, 0.25, 0.0, 1.0])
    # a translation costs exactly |t|^2 / 2 in OT with cost |x - y|^2 / 2; blur adds little
    assert torch.allclose(sinkhorn_divergence(x, x + shift, blur=0.01), torch.full((3,), shift.square().sum() / 2),
                          rtol=2e-2)  # over 50 seeds: relative error at most 2.1e-7
    perm = torch.randperm(40, generator=gen)
    assert sinkhorn_divergence(x, x[:, perm]).abs().max() < 1e-5  # a point cloud is a set; 50 seeds: 1.9e-9
    far = sinkhorn_divergence(x, 3 * x + 2)
    assert (far > 1).all()  # over 50 seeds: at least 16


def test_ssot_sinkhorn_is_per_sample_and_differentiable(gen):
    same = torch.randn(1, 6, 4, 4, generator=gen).repeat(3, 1, 1, 1).requires_grad_(True)
    assert ssot_loss([same], "sinkhorn", gen).abs() < 1e-4  # every sample identical: nothing to transport; 50 seeds: 0
    z = torch.randn(3, 6, 4, 4, generator=gen, requires_grad=True)
    value = ssot_loss([z], "sinkhorn", gen)
    value.backward()
    assert value > 1e-3 and z.grad.abs().sum() > 0  # over 50 seeds: 0.34-0.44
    assert ssot_loss([z], "off", gen) == 0
    with pytest.raises(ValueError, match="ssot must be one of"):
        ssot_loss([z], "geomloss", gen)


@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (5, 3, 7, 9)])
def test_ssot_sinkhorn_is_the_batch_mean_of_the_divergence_to_the_rolled_batch(gen, shape):
    # ssot_loss computes one self-term where the divergence has two (the rolled batch's self-terms are the
    # same problems); value and gradient must still be the batch mean of sinkhorn_divergence itself.
    seed = int(torch.randint(2**31, (1,), generator=gen))
    z = torch.randn(*shape, generator=gen, dtype=torch.float32, requires_grad=True)
    value = ssot_loss([z], "sinkhorn", torch.Generator().manual_seed(seed), num_points=10**6)
    (grad,) = torch.autograd.grad(value, z)
    shift = int(torch.randint(1, shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
    points = torch.nn.functional.normalize(z.flatten(2).transpose(1, 2), dim=2)
    expected = sinkhorn_divergence(points, points.roll(shift, dims=0), blur=0.05, diameter=2.0).mean()
    (expected_grad,) = torch.autograd.grad(expected, z)
    # float32 sums in another order; measured over 50 seeds: value and gradient <= 2.2e-7 relative
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6 * float(expected_grad.abs().max()))


def test_contrast_loss_definition(gen):
    a = torch.randn(4, 3, 5, 5, generator=gen)
    n = a + 0.1 * torch.randn(4, 3, 5, 5, generator=gen)
    cos = F.cosine_similarity(a.flatten(1), n.flatten(1))
    assert contrast_loss([a, a], [n, n]).item() == pytest.approx(2 * (cos - 0.5).clamp_min(0).mean().item(), rel=1e-6)
    assert contrast_loss([a], [-a]).item() == 0


def test_triplet_with_equal_positive_and_negative_is_the_margin(gen):
    a, p = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    assert triplet_loss([a, a, a], [p, p, p], [p, p, p]).item() == pytest.approx(3.0)
    assert triplet_loss([a], [a], [-a]).item() == pytest.approx(0.0, abs=1e-5)


def test_warmup_cosine_schedule():
    lr = [warmup_cosine(s, 5000, 500, 5e-3, 1e-4) for s in (0, 250, 500, 2750, 5000)]
    assert lr[0] == pytest.approx(1e-4) and lr[2] == pytest.approx(5e-3) and lr[4] == pytest.approx(1e-4)
    assert lr[1] == pytest.approx((1e-4 + 5e-3) / 2)
    assert lr[3] == pytest.approx((1e-4 + 5e-3) / 2)
