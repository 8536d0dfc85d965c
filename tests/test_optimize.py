"""model.optimize(): every method predicts as before (BatchNorm folded, inference mode), traces as one graph for
torch.compile, refuses to train or save."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FULLGRAPH_THROUGH_OPS, ext_loaded
from torch import nn

from dmgrd.models.base import METHODS
from dmgrd.models.optimize import conv_bn_pairs, fold_batchnorm
from dmgrd.ops import use_backend

SIZE = 64
# Folding rewrites bn(conv(x)) as one convolution: the same sums in another order. Relative to the largest
# map value (maps are sums of 1 - cos over levels, or PatchCore's distances); measured <= 4e-5 at these sizes.
TOLERANCE = 2e-4
SMALL = {"dmgrd": {"memory_size": 3, "texture_count": 2}, "memkd": {"exemplars": 3, "memory_items": 8}}
# every method's clean preset, and the presets only some methods have
CASES = [(method, "clean") for method in sorted(METHODS)] + [("dmgrd", "light")]


def fitted(method: str, backbone: str, preset: str = "clean") -> nn.Module:
    """A model with its data-built state and non-trivial BatchNorm statistics (so folding changes weights)."""
    torch.manual_seed(0)
    model = METHODS[method](backbone, weights=None, preset=preset, image_size=SIZE, **SMALL.get(method, {}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.uniform_(-0.2, 0.2, generator=gen)
    data = [{"image": torch.rand(3, SIZE, SIZE, generator=gen)} for _ in range(4)]
    model.train()
    model.prepare(data, torch.Generator().manual_seed(2), batch_size=2)
    return model.eval()


def assert_same_prediction(plain, fast, images) -> None:
    expected, got = plain(images), fast(images)
    scale = expected.anomaly_map.abs().max()
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, rtol=0, atol=TOLERANCE * scale)
    torch.testing.assert_close(got.score, expected.score, rtol=0, atol=TOLERANCE * expected.score.abs().max())


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
@pytest.mark.parametrize(("method", "preset"), CASES, ids=lambda x: x)
def test_optimized_model_predicts_the_same(method, preset, backbone):
    plain = fitted(method, backbone, preset)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    fast = copy.deepcopy(plain).optimize()
    assert batchnorms > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # all folded
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    assert_same_prediction(plain, fast, images)
    assert fast(images).anomaly_map.is_inference()


@pytest.mark.parametrize("channels_last", [None, False])
def test_channels_last_is_the_cpu_default_and_can_be_turned_off(channels_last):
    plain = fitted("dmgrd", "resnet18")
    fast = copy.deepcopy(plain).optimize(channels_last=channels_last)
    weight = fast.teacher.body.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == (channels_last is None)
    assert_same_prediction(plain, fast, torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)))


@pytest.mark.skipif(not FULLGRAPH_THROUGH_OPS, reason="older Dynamo breaks the graph at every dmgrd.ops call")
@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize(("method", "preset"), CASES, ids=lambda x: x)
def test_an_optimized_forward_compiles_as_one_graph(method, preset, backend):
    # optimize(compile=True) compiles score(): a data-dependent Python branch in it (DM-GRD's memory check
    # once split it into 6 graphs) would cut the graph, and fusion with it. The Triton interpreter is not
    # traceable, so the CPU backends are the extension and the torch references.
    if backend == "ext" and not ext_loaded():
        pytest.skip("dmgrd._C is not loaded (DMGRD_NO_EXT=1 install)")
    fast = fitted(method, "resnet18", preset).optimize()
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    with use_backend(backend), torch.inference_mode():
        explained = torch._dynamo.explain(fast.score)(images)
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]


def test_an_optimized_model_refuses_to_train_or_save(tmp_path):
    model = fitted("rd4ad", "resnet18").optimize()
    data = [{"image": torch.rand(3, SIZE, SIZE)} for _ in range(2)]
    with pytest.raises(RuntimeError, match=r"cannot train a model after optimize\(\)"):
        model.fit(data, steps=1, progress=False)
    with pytest.raises(RuntimeError, match=r"cannot save a model after optimize\(\)"):
        model.save(tmp_path / "model.pt")


class _SharedNorm(nn.Module):
    """One BatchNorm applied to two convolutions' outputs, and a convolution whose output also skips its norm:
    neither may be folded."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
        self.shared, self.own = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
        self.d, self.e = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.shared(self.a(x)) + self.shared(self.b(x))
        z = self.c(x)
        return y + self.own(z) + self.c(x) + self.e(self.d(x))


def test_only_batchnorms_fed_by_one_convolution_alone_are_folded():
    model = _SharedNorm().eval()
    with torch.no_grad():
        for bn in (model.shared, model.own, model.e):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 2, 5, 5)
    pairs = conv_bn_pairs(model, lambda: model(x))
    assert pairs == [("d", "e")]  # "shared" sees two convs; "own" runs once, its conv "c" twice
    expected = model(x)
    assert fold_batchnorm(model, pairs) == 1 and isinstance(model.e, nn.Identity)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
