"""DM-GRD memory through the ops: l2 selection by memory_nearest, patch memory with a coreset, the memory triplet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dmgrd
from dmgrd import ops
from dmgrd.losses import memory_margin_loss
from dmgrd.models.memory import MemoryBank, PatchMemoryBank

LITE0 = "efficientnet_lite0"
CHANNELS, SIZES = (4, 6, 8), ((8, 8), (4, 4), (2, 2))


def tiny_dmgrd(**options) -> dmgrd.DMGRD:
    """A random-weight DM-GRD at 64x64 whose (used) memory banks are built from 4 random images."""
    torch.manual_seed(0)
    model = dmgrd.DMGRD(LITE0, weights=None, image_size=64, memory_size=3, texture_count=2, ssot_points=16,
                        **options)
    gen = torch.Generator().manual_seed(0)
    model.prepare([{"image": torch.rand(3, 64, 64, generator=gen)} for _ in range(4)], gen)
    return model


@pytest.fixture(scope="module")
def patch_model() -> dmgrd.DMGRD:
    return tiny_dmgrd(memory="patch", coreset_ratio=0.1, coreset_projection=16, triplet="memory",
                      triplet_margin=4.0).eval()


def random_pyramid(gen, batch, scale=1.0) -> list[torch.Tensor]:
    return [scale * torch.randn(batch, c, h, w, generator=gen) for c, (h, w) in zip(CHANNELS, SIZES, strict=True)]


def filled(bank: MemoryBank, gen, **options) -> MemoryBank:
    bank.fill(random_pyramid(gen, bank.indices.numel()), torch.arange(bank.indices.numel()), **options)
    return bank


def old_l2_distances(feats, items) -> torch.Tensor:
    """The previous hand-written selection: one B x D @ D x L product per level, mean over C, H, W."""
    total = 0
    for f, m in zip(feats, items, strict=True):
        f, m = f.flatten(1).float(), m.flatten(1).float()
        total = total + (f.square().sum(1, keepdim=True) + m.square().sum(1) - 2 * f @ m.T).clamp_min(0) / f.shape[1]
    return total


# -- selection="l2" through memory_nearest -------------------------------------------------------------------


def test_l2_selection_equals_the_old_formula(gen):
    bank = filled(MemoryBank(CHANNELS, SIZES, memory_size=7), gen)
    queries = [m[[4, 0, 6]] + 0.3 * torch.randn_like(m[[4, 0, 6]]) for m in bank.items]
    # and 5 unrelated inputs
    queries = [torch.cat([q, f]) for q, f in zip(queries, random_pyramid(gen, 5), strict=True)]
    old = old_l2_distances(queries, bank.items)
    assert torch.allclose(bank.distances(queries), old, rtol=1e-5, atol=1e-5)
    chosen, guided = bank.select(queries)
    assert torch.equal(chosen, old.argmin(1)) and chosen[:3].tolist() == [4, 0, 6]
    for f, m, g in zip(queries, bank.items, guided, strict=True):
        assert torch.equal(g, torch.cat([f, (m[chosen] - f).square()], dim=1))
    flat = torch.cat([q.flatten(1) / q[0].numel() ** 0.5 for q in queries], 1)
    bank_flat = torch.cat([m.flatten(1) / m[0].numel() ** 0.5 for m in bank.items], 1)
    assert torch.equal(chosen, ops.memory_nearest_reference(flat, bank_flat)[1][:, 0])


def test_l2_cache_follows_refill_load_and_dtype(gen):
    bank = filled(MemoryBank(CHANNELS, SIZES, memory_size=5), gen)
    queries = random_pyramid(gen, 6)
    bank.select(queries)  # builds the flattened bank
    filled(bank, gen)  # new items in place
    assert torch.equal(bank.nearest(queries), old_l2_distances(queries, bank.items).argmin(1))
    other = filled(MemoryBank(CHANNELS, SIZES, memory_size=5), gen)
    bank.load_state_dict(other.state_dict())
    assert torch.equal(bank.nearest(queries), old_l2_distances(queries, other.items).argmin(1))
    bank.double()
    assert bank.flat_items().dtype == torch.float64
    expected = old_l2_distances(queries, other.items)
    assert torch.allclose(bank.distances([q.double() for q in queries]).float(), expected, rtol=1e-5, atol=1e-5)
    assert "flat" not in bank.state_dict() and len(bank.state_dict()) == 4  # items_0..2 and indices


def test_official_legacy_selection_stays_on_the_torch_code(gen, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("legacy selection must not call dmgrd.ops.memory_nearest")

    monkeypatch.setattr(ops, "memory_nearest", forbidden)
    bank = filled(MemoryBank(CHANNELS, SIZES, memory_size=6, selection="legacy"), gen)
    chosen, _ = bank.select(random_pyramid(gen, 4))
    assert set(chosen.tolist()) <= {1, 3, 5}
    with pytest.raises(AssertionError, match="must not call"):
        filled(MemoryBank(CHANNELS, SIZES, memory_size=6), gen).select(random_pyramid(gen, 1))


def gap_selection_formula(feats, items, selection: str) -> torch.Tensor:
    """The attention / legacy selection distances written out, the items' GAP recomputed from ``items``."""
    per_level = []
    for f, m in zip(feats, items, strict=True):
        gap = m.mean((2, 3))
        attention = torch.softmax(torch.einsum("lc,bcp->blp", F.normalize(gap, dim=1),
                                               F.normalize(f.flatten(2), dim=1)), dim=1)
        if selection == "attention":
            per_level.append(-attention.mean(2))
        else:
            readout = torch.einsum("blp,lc->bcp", attention, gap)
            per_level.append(readout.topk(m.shape[0] // 3, dim=1).values.mean(2))
    return sum(per_level) if selection == "attention" else torch.cat(per_level, dim=1)


@pytest.mark.parametrize("selection", ["attention", "legacy"])
def test_gap_selections_equal_their_formula_and_follow_refills(gen, selection):
    bank = filled(MemoryBank(CHANNELS, SIZES, memory_size=6, selection=selection), gen)
    queries = random_pyramid(gen, 3)
    for _ in range(2):  # the second time after new items in place: the cached GAP must follow them
        expected = gap_selection_formula(queries, bank.items, selection)
        assert torch.allclose(bank.distances(queries), expected, rtol=1e-5, atol=1e-6)
        filled(bank, gen)
    other = filled(MemoryBank(CHANNELS, SIZES, memory_size=6, selection=selection), gen)
    bank.load_state_dict(other.state_dict())
    expected = gap_selection_formula(queries, other.items, selection)
    assert torch.allclose(bank.distances(queries), expected, rtol=1e-5, atol=1e-6)


# -- memory="patch" ------------------------------------------------------------------------------------------


def brute_force_nearest(f: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel of f [B, C, H, W]: squared distances to every patch [P] in float64 and the nearest one."""
    pixels = f.double().permute(0, 2, 3, 1).unsqueeze(3)  # B x H x W x 1 x C
    dist = (pixels - patches.double()).square().sum(-1)  # B x H x W x P
    return dist, dist.argmin(-1)


def check_patch_selection(bank: PatchMemoryBank, feats: list[torch.Tensor], banks: list[torch.Tensor]) -> None:
    rows, guided = bank.select(feats)
    for f, patches, index, g in zip(feats, banks, rows, guided, strict=True):
        assert index.shape == (f.shape[0], *f.shape[2:]) and g.shape == (f.shape[0], 2 * f.shape[1], *f.shape[2:])
        dist, nearest = brute_force_nearest(f, patches)
        chosen = dist.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(chosen, dist.amin(-1), rtol=1e-5, atol=1e-6)  # a true nearest patch
        # the same one except at fp32 near-ties; over 50 seeds of both gen tests, every pixel's (level 2 has 8)
        assert (index == nearest).float().mean() > 0.99
        assert torch.equal(g[:, :f.shape[1]], f)
        assert torch.allclose(g[:, f.shape[1]:], (patches[index].permute(0, 3, 1, 2) - f).square(), atol=1e-6)


def test_patch_memory_finds_the_true_nearest_patch(gen):
    bank = filled(PatchMemoryBank(CHANNELS, SIZES, memory_size=3), gen)
    patches = [m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in bank.items]  # L*H*W x C, item by item
    assert [p.shape[0] for p in patches] == [192, 48, 12]
    assert all(torch.equal(bank.patch_bank(level), p) for level, p in enumerate(patches))
    queries = random_pyramid(gen, 2)
    check_patch_selection(bank, queries, patches)
    # a query made of memory patches finds exactly those patches (distance 0)
    copy = [p[perm].view(2, *f.shape[2:], -1).permute(0, 3, 1, 2)
            for p, f, perm in zip(patches, queries, (torch.randperm(192)[:128], torch.arange(32), torch.arange(8)),
                                  strict=True)]
    rows, guided = bank.select(copy)
    for f, p, index, g in zip(copy, patches, rows, guided, strict=True):
        assert torch.equal(p[index].permute(0, 3, 1, 2), f) and g[:, f.shape[1]:].abs().max() == 0


def test_patch_coreset_is_greedy_k_center_of_the_projected_patches(gen):
    bank = PatchMemoryBank(CHANNELS, SIZES, memory_size=3, coreset_ratio=0.25, coreset_projection=5)
    assert not bank.filled
    filled(bank, gen, generator=torch.Generator().manual_seed(3))
    assert bank.filled and [c.numel() for c in bank.coresets] == [48, 12, 3]
    projection_gen = torch.Generator().manual_seed(3)
    for level, (m, coreset) in enumerate(zip(bank.items, bank.coresets, strict=True)):
        patches = m.permute(0, 2, 3, 1).reshape(-1, m.shape[1])
        projection = 5 if m.shape[1] > 5 else None  # level 0 has 4 channels: no projection
        expected = ops.greedy_coreset(patches, coreset.numel(), projection_dim=projection, generator=projection_gen)
        assert torch.equal(coreset, expected) and len(set(coreset.tolist())) == coreset.numel()
        assert torch.equal(bank.patch_bank(level), patches[coreset])
    check_patch_selection(bank, random_pyramid(gen, 2), [bank.patch_bank(level) for level in range(3)])


def test_patch_model_selects_in_both_banks_and_scores(patch_model):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = patch_model.teacher(images)
        for bank in (patch_model.normal_memory, patch_model.abnormal_memory):
            assert isinstance(bank, PatchMemoryBank)
            check_patch_selection(bank, feats, [bank.patch_bank(level) for level in range(3)])
    prediction = patch_model(images)
    assert prediction.anomaly_map.shape == (2, 1, 64, 64) and torch.isfinite(prediction.anomaly_map).all()


def test_coreset_size_and_save_load_round_trip(patch_model, tmp_path):
    sizes = [int(0.1 * 3 * h * w) for h, w in ((16, 16), (8, 8), (4, 4))]
    for bank in (patch_model.normal_memory, patch_model.abnormal_memory):
        assert [c.numel() for c in bank.coresets] == sizes and bank.filled
    assert not torch.equal(patch_model.normal_memory.coreset_0, patch_model.abnormal_memory.coreset_0)
    path = tmp_path / "patch.pt"
    patch_model.save(path)
    loaded = dmgrd.load(path)
    assert loaded.config == patch_model.config
    for name in ("normal_memory", "abnormal_memory"):
        ours, theirs = getattr(patch_model, name), getattr(loaded, name)
        assert all(torch.equal(a, b) for a, b in zip(ours.coresets, theirs.coresets, strict=True))
        assert all(torch.equal(ours.patch_bank(level), theirs.patch_bank(level)) for level in range(3))
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(patch_model(images).anomaly_map, loaded(images).anomaly_map)


# -- triplet="memory" ----------------------------------------------------------------------------------------


def test_memory_triplet_equals_a_manual_computation(patch_model, gen):
    student = [torch.randn(3, c, 64 // s, 64 // s, generator=gen, requires_grad=True)
               for c, s in zip(patch_model.teacher.channels, (4, 8, 16), strict=True)]
    value = patch_model._triplet(None, None, None, None, None, student)
    expected = 0
    banks = zip(student, patch_model.normal_memory.items, patch_model.abnormal_memory.items, strict=True)
    for s, normal, abnormal in banks:
        q = F.normalize(s.detach().double().mean((2, 3)), dim=1)
        d_n = torch.cdist(q, F.normalize(normal.double().mean((2, 3)), dim=1)).square().amin(1)
        d_a = torch.cdist(q, F.normalize(abnormal.double().mean((2, 3)), dim=1)).square().amin(1)
        expected = expected + torch.relu(d_n - d_a + 4.0).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)
    value.backward()
    assert all(s.grad.abs().sum() > 0 for s in student)
    normal = [F.normalize(m.mean((2, 3)), dim=1) for m in patch_model.normal_memory.items]
    assert memory_margin_loss(student, normal, normal, 0.5).item() == pytest.approx(1.5)  # d_n = d_a: the margin


def test_training_steps_with_patch_memory_and_memory_triplet(patch_model):
    gen = torch.Generator().manual_seed(2)
    optimizer = torch.optim.Adam(patch_model.trainable_parameters(), lr=1e-3)
    before = [p.detach().clone() for p in patch_model.decoder.parameters()]
    patch_model.train()
    for step in range(2):
        optimizer.zero_grad()
        losses = patch_model.training_losses(torch.rand(2, 3, 64, 64, generator=gen), gen)
        assert all(torch.isfinite(v) for v in losses.values()) and losses["triplet"] > 0
        if step == 0:  # the memory triplet alone reaches the student, its bottleneck and the fusion
            losses["triplet"].backward(retain_graph=True)
            for part in (patch_model.decoder, patch_model.bottleneck, patch_model.fusion):
                assert sum(p.grad.abs().sum().item() for p in part.parameters() if p.grad is not None) > 0
            optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    patch_model.eval()
    optimizer.zero_grad(set_to_none=True)
    assert any(not torch.equal(a, b) for a, b in zip(before, patch_model.decoder.parameters(), strict=True))
    assert torch.isfinite(patch_model(torch.rand(1, 3, 64, 64, generator=gen)).anomaly_map).all()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"memory": "pixel"}, "memory must be one of"),
        ({"memory": "patch", "coreset_ratio": 0.0}, r"coreset_ratio must be in \(0, 1\]"),
        ({"coreset_ratio": 1.5}, "coreset_ratio must be"),
        ({"coreset_projection": 0}, "coreset_projection must be None or a positive int"),
        ({"triplet_margin": -1.0}, "triplet_margin must be >= 0"),
        ({"triplet": "triple"}, "triplet must be one of"),
        ({"memory": "patch", "triplet": "legacy"}, "triplet='legacy' gathers whole memory images"),
    ],
)
def test_bad_memory_options(options, message):
    with pytest.raises(ValueError, match=message):
        dmgrd.DMGRDConfig.from_preset("clean", **options)


def test_presets_keep_image_memory_and_their_triplets():
    for preset, triplet in (("clean", "embedding"), ("official", "legacy")):
        config = dmgrd.DMGRDConfig.from_preset(preset)
        assert config.memory == "image" and config.triplet == triplet and config.triplet_margin == 1.0


class _Selections(nn.Module):
    def __init__(self, banks: list[MemoryBank]):
        super().__init__()
        self.banks = nn.ModuleList(banks)

    def forward(self, *feats):
        return tuple(g for bank in self.banks for g in bank.select(list(feats))[1])


def test_memory_selection_exports_to_onnx(gen, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    banks = [filled(MemoryBank(CHANNELS, SIZES, memory_size=4), gen),
             filled(PatchMemoryBank(CHANNELS, SIZES, memory_size=3, coreset_ratio=0.5), gen)]
    graph, feats = _Selections(banks).eval(), random_pyramid(gen, 2)
    path = tmp_path / "selection.onnx"
    with torch.no_grad():
        torch.onnx.export(graph, tuple(feats), str(path), opset_version=17, dynamo=False)
        expected = graph(*feats)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: f.numpy() for i, f in zip(session.get_inputs(), feats, strict=True)})
    assert len(got) == 6
    assert all(torch.allclose(torch.from_numpy(g), e, atol=1e-5) for g, e in zip(got, expected, strict=True))
