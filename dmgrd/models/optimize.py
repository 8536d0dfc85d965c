"""The fast inference path behind ``model.optimize()``: eval mode, frozen weights, BatchNorm folded into the
convolution before it, on CPU the 1x1 and 3x3 convolutions and the stride-sized transposed convolutions of small
grids as one GEMM, optional channels_last and ``torch.compile``.

BatchNorm in eval mode is an affine map per channel, so ``bn(conv(x))`` equals one convolution with scaled
weights and a shifted bias. Which BatchNorm follows which convolution is read off one forward pass with hooks:
a BatchNorm is folded only when every input it received was the output of the same convolution, called as
often as the BatchNorm (the teacher's, the bottleneck's, the decoder's and MSFF's pairs).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d)


def conv_bn_pairs(model: nn.Module, run) -> list[tuple[str, str]]:
    """(convolution name, BatchNorm name) pairs whose BatchNorm only ever normalised that convolution's output
    during ``run()`` (a forward pass of ``model``)."""
    names = {module: name for name, module in model.named_modules()}
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id of a conv output -> (conv, output kept alive)
    calls: dict[nn.Module, int] = defaultdict(int)
    sources: dict[nn.Module, set] = defaultdict(set)  # BatchNorm -> the convs its inputs came from (None: other)

    def after_conv(module, args, output):
        calls[module] += 1
        produced[id(output)] = (module, output)

    def before_bn(module, args):
        calls[module] += 1
        sources[module].add(produced.get(id(args[0]), (None,))[0])

    handles = []
    for module in names:
        if isinstance(module, CONVOLUTIONS):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_bn))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for bn, convs in sources.items():
        (conv,) = convs if len(convs) == 1 else (None,)
        if conv is not None and calls[conv] == calls[bn] and _foldable(conv, bn):
            pairs.append((names[conv], names[bn]))
    return pairs


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, nn.BatchNorm2d):
        return False
    plain = type(bn) is nn.BatchNorm2d or _norm_act(bn) is not None
    transposed_groups = isinstance(conv, nn.ConvTranspose2d) and conv.groups != 1
    return plain and bn.track_running_stats and bn.running_mean is not None and not transposed_groups


def _norm_act(bn: nn.Module) -> nn.Module | None:
    """What is left of a norm-plus-activation module (timm's ``BatchNormAct2d``) once its norm is folded."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return nn.Sequential(drop, act)
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]]) -> int:
    """Replace each (conv, BatchNorm) pair by the fused convolution and an identity (or the norm's activation);
    the model must be in eval mode. Returns how many were folded."""
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        assert isinstance(conv, CONVOLUTIONS) and isinstance(bn, nn.BatchNorm2d)
        fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
        rest = _norm_act(bn)
        assert rest is not None  # conv_bn_pairs keeps foldable pairs only
        _replace(model, conv_name, fused.requires_grad_(False))
        _replace(model, bn_name, rest)
    return len(pairs)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def optimize(model, *, channels_last: bool | None = None, window_gemm: bool | None = None, compile: bool = False):
    """``model`` for inference only, in place: eval mode, no gradients, every BatchNorm that follows a
    convolution folded into it (found on one forward of random images), channels_last weights
    (``channels_last=None``: on CPU, where oneDNN runs the depthwise and 1x1 convolutions of efficientnet_lite0
    2x faster so and WRN50 as fast; not on CUDA, unmeasured there), the 1x1 and 3x3 convolutions and the transposed
    convolutions whose kernel is their stride, on small grids, as one GEMM (:class:`WindowGemmConv2d`,
    :class:`GemmConvTranspose2d`; ``window_gemm=None``: on CPU with channels_last, where it was measured),
    and its :meth:`score` compiled with ``torch.compile`` if asked; its forward then runs under
    ``torch.inference_mode``. Returns ``model``."""
    model.eval().requires_grad_(False)
    height, width = model.config.size
    example = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(model.device)
    fold_batchnorm(model, conv_bn_pairs(model, lambda: model(example)))
    on_cpu = model.device.type == "cpu"
    channels_last = on_cpu if channels_last is None else channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if window_gemm is None:
        window_gemm = on_cpu and channels_last
    if window_gemm:
        use_window_gemm(model)
    if compile:
        model.score = torch.compile(model.score, dynamic=False)
    model.optimized = True
    return model


class _GemmLayer(nn.Module):
    """The frozen weight and bias of a convolution run as a GEMM: the weight channels_last, so that its
    ``[rows, cols, kh, kw]`` memory is the GEMM's ``[rows, kh * kw * cols]`` operand (:meth:`gemm_weight`)."""

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d):
        super().__init__()
        weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def gemm_weight(self) -> torch.Tensor:
        """``[weight.shape[0], kh * kw * weight.shape[1]]``, (row, column, channel) order: a view of
        :attr:`weight`."""
        return self.weight.permute(0, 2, 3, 1).reshape(self.weight.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.as_gemm(x) if runs_as_gemm(*x.shape) else self.direct(x)

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        """The layer through ``torch.nn.functional`` (oneDNN on CPU)."""
        raise NotImplementedError

    def as_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as one GEMM."""
        raise NotImplementedError

    def _product(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return rows @ weight if bias is None else torch.addmm(bias, rows, weight)


class WindowGemmConv2d(_GemmLayer):
    """A 3x3 (or 1x1), stride-1, zero-"same"-padded convolution that runs as one GEMM over the 9 shifted windows
    (or the pixels) of the NHWC input when the output has few pixels for its input channels
    (``B * H * W * 2048 <= C_in ** 2``), and as ``F.conv2d`` otherwise. oneDNN's direct convolution is slow
    there: with 2 threads, 3x3 ``[1, 2048, 16, 16]`` ran at 146 GFLOP/s against 293 as a GEMM, ``[8, 1024, 8,
    8]`` 235 against 316, 1x1 ``[1, 2048, 8, 8] -> 1024`` 141 against 231, while ``[8, 512, 32, 32]`` and the
    efficientnet_lite0 shapes measured ran faster direct (README, "End-to-end speed"). One weight serves both:
    the channels_last ``[C_out, C_in, k, k]`` weight is, as memory, the GEMM's ``[C_out, k * k * C_in]``."""

    def __init__(self, conv: nn.Module):
        if not isinstance(conv, nn.Conv2d) or not eligible_for_window_gemm(conv):
            raise ValueError(f"not a 1x1 or 3x3 stride-1 zero-'same'-padded dense convolution: {conv}")
        super().__init__(conv)
        self.padding = conv.padding

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)

    def as_gemm(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        if self.weight.shape[-1] == 1:
            windows = x.permute(0, 2, 3, 1)
        else:
            padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
            windows = torch.cat([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], dim=3)
        out = self._product(windows.reshape(batch * height * width, -1), self.gemm_weight().t(), self.bias)
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


class GemmConvTranspose2d(_GemmLayer):
    """A transposed convolution whose kernel equals its stride (no padding, no overlap, e.g. the decoders' 2x2
    stride-2 upsampling) as one GEMM, ``[B * H * W, C_in] @ [C_in, kh * kw * C_out]``, and a pixel shuffle of
    its result when the input has few pixels for its channels (:func:`runs_as_gemm`), and as
    ``F.conv_transpose2d`` otherwise. With 2 threads oneDNN ran ``[1, 2048, 8, 8] -> 1024`` at 53 GFLOP/s against
    236 as a GEMM, ``[8, 2048, 8, 8]`` 155 against 311, while ``[8, 512, 32, 32] -> 256`` ran faster direct
    (196 / 157: the shuffle's copy). The channels_last ``[C_in, C_out, kh, kw]`` weight is, as memory, the
    GEMM's ``[C_in, kh * kw * C_out]``."""

    def __init__(self, conv: nn.Module):
        if not isinstance(conv, nn.ConvTranspose2d) or not eligible_for_gemm_transpose(conv):
            raise ValueError(f"not a transposed convolution with kernel = stride and no padding: {conv}")
        super().__init__(conv)
        self.stride = conv.stride

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, self.bias, stride=self.stride)

    def as_gemm(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        (kh, kw), out_channels = self.stride, self.weight.shape[1]
        bias = None if self.bias is None else self.bias.repeat(kh * kw)
        out = self._product(x.permute(0, 2, 3, 1).reshape(batch * height * width, channels), self.gemm_weight(), bias)
        out = out.view(batch, height, width, kh, kw, out_channels).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(batch, height * kh, width * kw, out_channels).permute(0, 3, 1, 2)


def runs_as_gemm(batch: int, channels: int, height: int, width: int) -> bool:
    """Whether :class:`WindowGemmConv2d` and :class:`GemmConvTranspose2d` take the GEMM path for an input of
    this shape."""
    return batch * height * width * 2048 <= channels * channels


def eligible_for_window_gemm(module: nn.Module) -> bool:
    """Whether ``module`` is a plain 3x3 (padding 1) or 1x1 (no padding), stride-1, dilation-1, dense,
    zero-padded ``nn.Conv2d``."""
    return (type(module) is nn.Conv2d and (module.kernel_size, module.padding) in (((3, 3), (1, 1)), ((1, 1), (0, 0)))
            and module.stride == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def eligible_for_gemm_transpose(module: nn.Module) -> bool:
    """Whether ``module`` is a plain ``nn.ConvTranspose2d`` whose kernel is its stride: dense, no padding, no
    output padding, dilation 1."""
    return (type(module) is nn.ConvTranspose2d and module.kernel_size == module.stride
            and module.padding == (0, 0) and module.output_padding == (0, 0) and module.dilation == (1, 1)
            and module.groups == 1)


def use_window_gemm(model: nn.Module) -> int:
    """Replace every eligible convolution of ``model`` by a :class:`WindowGemmConv2d` and every eligible
    transposed convolution by a :class:`GemmConvTranspose2d`; returns how many."""
    replaced = 0
    for eligible, fast in ((eligible_for_window_gemm, WindowGemmConv2d),
                           (eligible_for_gemm_transpose, GemmConvTranspose2d)):
        names = [name for name, module in model.named_modules() if eligible(module)]
        for name in names:
            _replace(model, name, fast(model.get_submodule(name)))
        replaced += len(names)
    return replaced
