"""model.optimize(): every method predicts as before (BatchNorm folded, inference mode), traces as one graph for
torch.compile, refuses to train or save."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FULLGRAPH_THROUGH_OPS, ext_loaded
from torch import nn

from dmgrd.models.base import METHODS
from dmgrd.models.optimize import (
    GemmConvTranspose2d,
    WindowGemmConv2d,
    conv_bn_pairs,
    eligible_for_gemm_transpose,
    eligible_for_window_gemm,
    fold_batchnorm,
    runs_as_gemm,
    use_window_gemm,
)
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


@pytest.mark.parametrize(("channels_last", "window_gemm", "expected"),
                         [(None, None, True), (None, False, False), (False, None, False), (False, True, True)])
def test_window_gemm_convolutions_are_the_cpu_channels_last_default(channels_last, window_gemm, expected):
    plain = fitted("dmgrd", "resnet18")
    fast = copy.deepcopy(plain).optimize(channels_last=channels_last, window_gemm=window_gemm)
    for fast_type, eligible in ((WindowGemmConv2d, eligible_for_window_gemm),
                                (GemmConvTranspose2d, eligible_for_gemm_transpose)):
        assert any(isinstance(m, fast_type) for m in fast.modules()) == expected
        assert not expected or not any(eligible(m) for m in fast.modules())  # all of them
    assert_same_prediction(plain, fast, torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)))


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


# WindowGemmConv2d's two paths against the convolution it replaces, relative to the output's largest value:
# float32 sums of 9 * C_in (or C_in) products in another order, measured <= 2.3e-6 (3x3) and 4.2e-7 (1x1) over 20
# seeds of these cases;
# bfloat16 (both paths accumulate in float32 and round once) equal there, where one bfloat16 step of the largest
# value would be 7.8e-3.
WINDOW_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize(("batch", "channels", "out_channels", "height", "width", "bias", "gemm"), [
    (1, 256, 96, 5, 6, True, True),     # 30 pixels of 256 channels (30 * 2048 < 256 ** 2)
    (2, 192, 64, 3, 3, False, True),    # 18 pixels, no bias: at the threshold, 18 * 2048 = 192 ** 2
    (1, 256, 96, 5, 7, True, False),    # 35 pixels of 256 channels: just past it, the direct path
    (3, 64, 40, 9, 11, True, False),    # 297 pixels of 64 channels: the direct path
    (2, 256, 33, 4, 4, True, True),     # 32 * 2048 = 256 ** 2, odd output channels
])
@pytest.mark.parametrize("kernel", [3, 1])
def test_window_gemm_convolution_equals_the_convolution(batch, channels, out_channels, height, width, bias, gemm,
                                                        layout, dtype, kernel):
    conv = nn.Conv2d(channels, out_channels, kernel, padding=kernel // 2, bias=bias)
    check_gemm_layer(conv, WindowGemmConv2d, (batch, channels, height, width), layout, dtype, gemm)


def check_gemm_layer(layer: nn.Module, fast_type: type, shape: tuple[int, ...], layout: str, dtype: torch.dtype,
                     gemm: bool) -> None:
    """``fast_type(layer)`` equals ``layer`` (random weights) on a random ``shape`` input in ``layout``, and takes
    the GEMM path exactly when ``gemm``."""
    gen = torch.Generator().manual_seed(6)
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    batch, channels, height, width = shape
    x = torch.randn(batch, channels, height, width + (2 if layout == "sliced" else 0), generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # non-contiguous: every pixel row has two columns cut off
        x = x[..., 1:-1]
    fast = fast_type(layer)
    with torch.no_grad():
        expected, got = layer(x), fast(x)
    assert fast.gemm_weight().data_ptr() == fast.weight.data_ptr()  # one copy of the weight, a view
    assert runs_as_gemm(batch, channels, height, width) == gemm
    assert got.shape == expected.shape
    scale = expected.float().abs().max()
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=WINDOW_TOLERANCE[dtype] * scale)


def test_only_dense_1x1_and_3x3_stride_1_convolutions_run_as_window_gemms():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                          nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, padding=1),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 5, padding=2),
                          nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.Conv2d(8, 8, 3, padding=1,
                                                                               padding_mode="reflect"))
    assert use_window_gemm(model) == 2
    assert isinstance(model[0], WindowGemmConv2d) and isinstance(model[1], WindowGemmConv2d)
    assert all(type(module) is nn.Conv2d for module in model[2:])
    with pytest.raises(ValueError, match="not a 1x1 or 3x3 stride-1"):
        WindowGemmConv2d(model[2])


# GemmConvTranspose2d's two paths against the transposed convolution it replaces, relative to the output's
# largest value: each output is one sum of C_in products (kernel = stride: no overlap), perhaps in another order on
# the GEMM path; equal in float32 and bfloat16 over 20 seeds of these cases, 1.8e-6 at the decoder's
# [1, 2048, 8, 8] -> 1024 (too slow for a test), so the window tolerance holds.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize(("batch", "channels", "out_channels", "height", "width", "kernel", "bias", "gemm"), [
    (1, 256, 96, 5, 6, 2, True, True),          # 30 pixels of 256 channels: the GEMM path
    (2, 192, 33, 3, 3, 2, False, True),         # at the threshold (18 * 2048 = 192 ** 2), odd C_out, no bias
    (1, 256, 40, 5, 7, 2, True, False),         # 35 pixels: just past it, the direct path
    (2, 256, 24, 2, 3, (2, 3), True, True),     # a non-square kernel and stride
    (3, 64, 40, 9, 11, 3, True, False),         # 297 pixels of 64 channels: the direct path
])
def test_gemm_transposed_convolution_equals_the_transposed_convolution(batch, channels, out_channels, height, width,
                                                                      kernel, bias, gemm, layout, dtype):
    conv = nn.ConvTranspose2d(channels, out_channels, kernel, stride=kernel, bias=bias)
    check_gemm_layer(conv, GemmConvTranspose2d, (batch, channels, height, width), layout, dtype, gemm)


def test_only_transposed_convolutions_whose_kernel_is_the_stride_run_as_gemms():
    model = nn.Sequential(nn.ConvTranspose2d(8, 8, 2, stride=2), nn.ConvTranspose2d(8, 8, 3, stride=2),
                          nn.ConvTranspose2d(8, 8, 2, stride=2, padding=1), nn.ConvTranspose2d(8, 8, 2, stride=2,
                                                                                              groups=2),
                          nn.ConvTranspose2d(8, 8, 1, stride=1, output_padding=0, dilation=2),
                          nn.ConvTranspose2d(8, 8, 2, stride=2, output_padding=1, dilation=2))
    assert use_window_gemm(model) == 1
    assert isinstance(model[0], GemmConvTranspose2d)
    assert all(type(module) is nn.ConvTranspose2d for module in model[1:])
    with pytest.raises(ValueError, match="kernel = stride"):
        GemmConvTranspose2d(model[1])
