"""MemKD: the NR memory, exemplar selection, the normality-embedding loss, training, save/load, the CLI,
and the decoder extension point it uses (RD4AD unchanged)."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dmgrd
from dmgrd.cli import main
from dmgrd.layout import pixel_rows
from dmgrd.losses import kd_loss
from dmgrd.models.nr_memory import NRMemory, spherical_kmeans
from dmgrd.ops.coreset_update import greedy_coreset, nearest_to_mean

LITE0 = "efficientnet_lite0"
SIZE = 64


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def train_set(count: int = 6, seed: int = 0) -> list[dict]:
    return [{"image": image} for image in images(count, seed)]


def memkd(**options) -> dmgrd.MemKD:
    torch.manual_seed(0)
    defaults = {"memory_items": 8, "exemplars": 3, "seed": 0}
    return dmgrd.MemKD(LITE0, weights=None, image_size=SIZE, **{**defaults, **options})


@pytest.fixture(scope="module")
def fitted():
    model = memkd()
    history = model.fit(train_set(), steps=3, batch_size=2, progress=False)
    return model, history


def manual_readout(query: torch.Tensor, memory: torch.Tensor, temperature: float) -> torch.Tensor:
    cos = F.cosine_similarity(query[:, None, :], memory[None, :, :], dim=2)
    return torch.softmax(cos / temperature, dim=1) @ memory


def naive_kcenter(points: list[list[float]], k: int) -> list[int]:
    """Greedy k-center written out with plain Python loops (start: the point nearest the mean)."""
    dim = len(points[0])
    mean = [sum(p[d] for p in points) / len(points) for d in range(dim)]
    chosen = [min(range(len(points)), key=lambda i: math.dist(points[i], mean))]
    while len(chosen) < k:
        gaps = [min(math.dist(p, points[c]) for c in chosen) for p in points]
        chosen.append(max(range(len(points)), key=lambda i: (gaps[i], -i)))
    return chosen


def kcenter_radius(points: torch.Tensor, centres: list[int]) -> float:
    return torch.cdist(points, points[centres]).amin(1).max().item()


# -- NR memory -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nr_memory_recall_and_output_match_a_manual_computation(dtype):
    torch.manual_seed(1)
    memory = NRMemory(6, items=5, temperature=0.2).to(dtype)
    x = torch.randn(2, 3, 5, 6, dtype=dtype).permute(0, 3, 1, 2)  # [2, 6, 3, 5], channels-last strides
    out = memory(x)
    assert out.shape == x.shape and out.dtype == dtype
    query = x.permute(0, 2, 3, 1).reshape(-1, 6)
    recalled = manual_readout(query, memory.memory.detach(), 0.2)
    tol = {"atol": 1e-5, "rtol": 1e-5}  # the read-out accumulates in float32 for every input dtype
    torch.testing.assert_close(memory.recall(query), recalled, **tol)
    weight, bias = memory.fuse.weight[:, :, 0, 0].detach(), memory.fuse.bias.detach()
    expected = torch.cat([query, recalled], dim=1) @ weight.T + bias + query
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(-1, 6), expected, **tol)


def test_nr_memory_hard_shrinkage():
    torch.manual_seed(2)
    items = 6
    plain = NRMemory(4, items=items, temperature=0.5)
    shrunk = NRMemory(4, items=items, temperature=0.5, shrink=1 / items)
    shrunk.load_state_dict(plain.state_dict())
    query = torch.randn(40, 4)
    weights = shrunk.weights(query)
    soft = plain.weights(query)
    kept = torch.where(soft > 1 / items, soft, torch.zeros_like(soft))
    torch.testing.assert_close(weights, kept / kept.sum(1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert (weights == 0).any() and (weights > 0).sum(1).min() >= 1
    torch.testing.assert_close(shrunk.recall(query), weights @ shrunk.memory.detach())
    assert not torch.allclose(shrunk.recall(query), plain.recall(query), atol=1e-3)
    shrunk(torch.randn(1, 4, 3, 3)).sum().backward()
    assert shrunk.memory.grad.abs().sum() > 0


def test_nr_memory_rejects_bad_options_and_inputs():
    with pytest.raises(ValueError, match="temperature"):
        NRMemory(4, temperature=0)
    with pytest.raises(ValueError, match="shrink"):
        NRMemory(4, shrink=1.5)
    with pytest.raises(ValueError, match="items"):
        NRMemory(4, items=0)
    memory = NRMemory(4, items=5)
    with pytest.raises(ValueError, match="feature size"):
        memory(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="at least as many"):
        memory.init_from(torch.randn(4, 4))
    with pytest.raises(ValueError, match="method"):
        memory.init_from(torch.randn(8, 4), "pca")


def test_memory_initialisation_from_features():
    gen = torch.Generator().manual_seed(3)
    directions = torch.eye(3, 5)
    feats = torch.cat([d * (1 + torch.rand(20, 1, generator=gen)) + 0.01 * torch.randn(20, 5, generator=gen)
                       for d in directions])  # three tight clusters in direction, spread in scale
    memory = NRMemory(5, items=3)
    memory.init_from(feats, "kmeans")
    centres = sorted(memory.memory.detach().tolist(), key=lambda c: max(range(5), key=lambda i: c[i]))
    expected = [feats[20 * i:20 * i + 20].mean(0) for i in range(3)]
    torch.testing.assert_close(torch.tensor(centres), torch.stack(expected))
    memory.init_from(feats.reshape(3, 20, 5, 1).permute(0, 2, 1, 3), "kcenter")  # [K, C, H, W] maps
    picked = central_kcenter(F.normalize(feats, dim=1), 3)
    assert torch.equal(memory.memory.detach(), feats[picked])


# -- exemplar selection --------------------------------------------------------------------------------
def central_kcenter(points: torch.Tensor, k: int) -> torch.Tensor:
    """MemKD's greedy k-center: dmgrd.ops.greedy_coreset from the point nearest the mean."""
    return greedy_coreset(points, k, start=nearest_to_mean(points))


def test_central_kcenter_is_the_greedy_algorithm_and_a_two_approximation():
    gen = torch.Generator().manual_seed(4)
    points = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    for k in (1, 3, 5):
        chosen = central_kcenter(points, k).tolist()
        assert chosen == naive_kcenter(points.tolist(), k)
        optimum = min(kcenter_radius(points, list(s)) for s in itertools.combinations(range(8), k))
        assert kcenter_radius(points, chosen) <= 2 * optimum + 1e-12
    with pytest.raises(ValueError, match="size must be"):
        central_kcenter(points, 9)


def test_exemplars_are_the_greedy_kcenter_of_pooled_teacher_features(fitted):
    model, _ = fitted
    feats = model.teacher(images(6, 0))
    pooled = feats[2].mean((2, 3)).double()
    chosen = model.exemplar_memory.indices
    assert chosen.tolist() == naive_kcenter(pooled.tolist(), 3)
    for level, f in enumerate(feats):
        torch.testing.assert_close(model.exemplar_features[level], f[chosen])


@pytest.mark.parametrize("init", ["kmeans", "kcenter", "random"])
def test_prepare_initialises_the_memories_from_the_exemplars(init):
    model = memkd(memory_init=init, exemplar_selection="random")
    before = [m.memory.detach().clone() for m in model.memories]
    model.prepare(train_set(4), torch.Generator().manual_seed(5), batch_size=4)
    expected = torch.randperm(4, generator=torch.Generator().manual_seed(5))[:3]
    assert model.exemplar_memory.indices.tolist() == expected.tolist()
    for memory, feats, old in zip(model.memories, model.exemplar_features, before, strict=True):
        rows = pixel_rows(feats)
        if init == "kmeans":
            assert torch.equal(memory.memory.detach(), spherical_kmeans(rows, 8))
        elif init == "kcenter":
            assert torch.equal(memory.memory.detach(), rows[central_kcenter(F.normalize(rows, dim=1), 8)])
        else:
            assert torch.equal(memory.memory.detach(), old)


# -- losses and training -------------------------------------------------------------------------------
def test_normality_embedding_loss_matches_a_manual_computation(fitted):
    model, _ = fitted
    model.eval()
    manual = 0.0
    for memory, feats in zip(model.memories, model.exemplar_features, strict=True):
        rows = pixel_rows(feats)
        distance = 1 - F.cosine_similarity(rows[:, None, :], memory.memory.detach()[None], dim=2)
        recalled = pixel_rows(memory(feats).detach())
        manual += distance.amin(1).mean() + (1 - F.cosine_similarity(recalled, rows, dim=1)).mean()
    ne = model.normality_embedding_loss()
    assert ne.item() == pytest.approx(manual.item(), rel=1e-5) and ne.item() > 0
    batch = images(2, 9)
    losses = model.training_losses(batch, torch.Generator())
    kd = kd_loss(model.teacher(batch), model.decode(model.teacher(batch)))
    assert losses["loss"].item() == pytest.approx(kd.item() + 0.1 * manual.item(), rel=1e-5)


def _grad_norm(module: nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_gradients_reach_every_trainable_part(fitted):
    model, _ = fitted
    model.train()
    model.zero_grad()
    model.training_losses(images(2, 7), torch.Generator())["loss"].backward()
    for memory in model.memories:
        assert memory.memory.grad.abs().sum() > 0
        assert memory.fuse.weight.grad.abs().sum() > 0 and memory.fuse.bias.grad.abs().sum() > 0
    assert _grad_norm(model.bottleneck) > 0 and _grad_norm(model.decoder) > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert {id(p) for p in model.trainable_parameters()} == (
        {id(p) for p in model.memories.parameters()} | {id(p) for p in model.bottleneck.parameters()}
        | {id(p) for p in model.decoder.parameters()})
    model.zero_grad()
    model.eval()


def test_a_short_fit_lowers_the_loss(fitted):
    _, history = fitted
    assert history[-1]["loss"] < history[0]["loss"]  # over 20 model and data seeds: last / first 0.56-0.68
    assert history[-1]["ne"] < history[0]["ne"]  # over 20 seeds: 0.86-0.94 (mean 0.91, sd 0.02)
    assert all(math.isfinite(h["kd"]) for h in history)


def test_memories_follow_the_chosen_levels_coarse_to_fine():
    model = memkd(memory_levels=(3, 1)).eval()
    assert model.config.memory_levels == (1, 3)
    assert [type(m) for m in model.memories] == [NRMemory, nn.Identity, NRMemory]
    feats = model.teacher(images(3, 3))
    model.exemplar_memory.fill([f + 0.1 * torch.randn_like(f) for f in feats], torch.arange(3))
    decoder = model.decoder
    s3 = model.memories[2](decoder.stage3(model.bottleneck(feats)))
    s2 = decoder.stage2(s3)
    s1 = model.memories[0](decoder.stage1(s2))
    for got, want in zip(model.student_features(feats), [s1, s2, s3], strict=True):
        assert torch.equal(got, want)
    assert model.normality_embedding_loss().item() == pytest.approx(sum(
        dmgrd.models.memkd.normality_embedding_loss(model.exemplar_features[i], model.memories[i]).item()
        for i in (0, 2)))


def test_rd4ad_is_unchanged_by_the_decoder_extension_point():
    torch.manual_seed(0)
    model = dmgrd.RD4AD(LITE0, weights=None, image_size=SIZE).eval()
    feats = model.teacher(images(2, 4))
    code = model.bottleneck(feats)
    decoder = model.decoder
    s3 = decoder.stage3(code)
    s2 = decoder.stage2(s3)
    before = [decoder.stage1(s2), s2, s3]  # the decoder's forward before the extension point
    for got in (model.student_features(feats), decoder(code, [nn.Identity()] * 3)):
        for g, want in zip(got, before, strict=True):
            assert torch.equal(g, want)
    assert not any("memor" in name for name in model.state_dict())


# -- persistence, configuration, CLI -------------------------------------------------------------------
def test_save_load_round_trip(fitted, tmp_path):
    model, _ = fitted
    model.eval()
    path = tmp_path / "memkd.pt"
    model.save(path)
    loaded = dmgrd.load(path)
    assert isinstance(loaded, dmgrd.MemKD) and not loaded.training and loaded.config == model.config
    assert torch.equal(loaded.exemplar_memory.indices, model.exemplar_memory.indices)
    for ours, theirs in zip(model.exemplar_features, loaded.exemplar_features, strict=True):
        assert torch.equal(ours, theirs) and ours.abs().sum() > 0
    for ours, theirs in zip(model.memories, loaded.memories, strict=True):
        assert torch.equal(ours.memory, theirs.memory)
    batch = images(2, 11)
    first, second = model(batch), loaded(batch)
    assert torch.equal(first.anomaly_map, second.anomaly_map) and torch.equal(first.score, second.score)


def test_presets_bad_options_and_unprepared_training():
    clean, official = dmgrd.MemKDConfig.from_preset("clean"), dmgrd.MemKDConfig.from_preset("official")
    assert {k for k, v in clean.to_dict().items() if official.to_dict()[k] != v} == {"preset"}
    assert (clean.memory_levels, clean.memory_items, clean.temperature, clean.shrink, clean.exemplars,
            clean.ne_weight, clean.image_score) == ((1, 2, 3), 50, 0.1, None, 10, 0.1, "max")
    with pytest.raises(ValueError, match="memory_levels"):
        dmgrd.MemKDConfig(memory_levels=(0, 2))
    with pytest.raises(ValueError, match="memory_levels"):
        dmgrd.MemKDConfig(memory_levels=())
    with pytest.raises(ValueError, match="exemplars must be at least 3"):
        dmgrd.MemKDConfig(exemplars=2)
    with pytest.raises(ValueError, match="memory_init must be one of"):
        dmgrd.MemKDConfig(memory_init="pca")
    with pytest.raises(TypeError, match="unknown MemKDConfig option"):
        memkd(memory_size=3)
    model = memkd()
    with pytest.raises(RuntimeError, match="prepare"):
        model.training_losses(images(2, 0), torch.Generator())
    with pytest.raises(ValueError, match="at least exemplars=3"):
        model.prepare(train_set(2), torch.Generator())


def test_cli_trains_memkd_on_synthetic_data(tmp_path, monkeypatch):
    assert "memkd" in dmgrd.models.METHODS
    # 12 instead of 200 training images: exemplar selection runs the teacher over all of them
    monkeypatch.setattr(dmgrd.data, "Synthetic", functools.partial(dmgrd.data.Synthetic, num_train=12))
    assert main(["train", "--dataset", "synthetic", "--category", "texture", "--device", "cpu", "--batch-size", "4",
                 "--method", "memkd", "--backbone", LITE0, "--weights", "none", "--image-size", str(SIZE),
                 "--steps", "2", "--out", str(tmp_path)]) == 0
    model, extra = dmgrd.models.read_checkpoint(tmp_path / "model.pt")
    assert isinstance(model, dmgrd.MemKD) and extra["train_state"]["step"] == 2
    assert model.exemplar_memory.filled and len(set(model.exemplar_memory.indices.tolist())) == 10
