"""Multi-scale feature fusion (MSFF, SPEC §4.4): DM-GRD's module that merges the memory-guided features
``[F_l, (M_l - F_l)^2]`` of three levels into teacher-shaped features for the student."""

import torch
import torch.nn.functional as F
from torch import nn

from dmgrd import ops
from dmgrd.ops.fuse_pyramid import upsample_like

ATTENTION_MODES = ("softmax", "dot_product")


class NonLocal2D(nn.Module):
    """Non-local block (Wang et al.) with 2x2 max-pooled keys and values, starting as the identity.

    ``attention="softmax"`` (embedded Gaussian) runs through ``scaled_dot_product_attention``;
    ``"dot_product"`` is the official code's form ``(theta^T phi / N) g``, computed as
    ``theta (phi g) / N`` so the N x N' matrix is never built (same values, far cheaper).
    """

    def __init__(self, channels: int, attention: str = "softmax"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        inter = max(channels // 2, 1)
        self.attention = attention
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Sequential(nn.Conv2d(channels, inter, 1), nn.MaxPool2d(2, ceil_mode=True))
        self.g = nn.Sequential(nn.Conv2d(channels, inter, 1), nn.MaxPool2d(2, ceil_mode=True))
        norm = nn.BatchNorm2d(channels)
        nn.init.zeros_(norm.weight)
        nn.init.zeros_(norm.bias)
        self.out = nn.Sequential(nn.Conv2d(inter, channels, 1), norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        query = self.theta(x).flatten(2).transpose(1, 2)  # B x N x inter
        key = self.phi(x).flatten(2).transpose(1, 2)  # B x N' x inter
        value = self.g(x).flatten(2).transpose(1, 2)
        if self.attention == "softmax":
            # Contiguous rows: SDPA's fused (flash) kernels need them; strided views fell back to the math path,
            # 9x slower on CPU at efficientnet_lite0 sizes (same values up to float rounding, 5e-7).
            query, key, value = (t.contiguous().unsqueeze(1) for t in (query, key, value))
            y = F.scaled_dot_product_attention(query, key, value).squeeze(1)
        else:
            y = query @ (key.transpose(1, 2) @ value) / key.shape[1]
        return x + self.out(y.transpose(1, 2).reshape(b, y.shape[2], h, w))


class MSFFBlock(nn.Module):
    """conv3x3 branch gated by a non-local branch, then two 3x3 convs halving the channels."""

    def __init__(self, channels: int, attention: str = "softmax"):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.nonlocal_block = NonLocal2D(channels, attention)
        self.reduce = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1),
                                    nn.Conv2d(channels // 2, channels // 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.conv(x) * self.nonlocal_block(x))


class SpatialAttention(nn.Module):
    """CBAM spatial attention logits ``conv7x7([max_c x, mean_c x])``; the sigmoid is applied by
    :func:`dmgrd.ops.fuse_pyramid`, which chains the masks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(ops.channel_pool(x))


class MSFF(nn.Module):
    """Three MSFF blocks, a top-down pathway, and spatial-attention masks chained coarse to fine.

    Takes the memory-guided inputs (``2 * C_l`` channels per level) and returns ``C_l`` channels per level.
    """

    def __init__(self, channels: tuple[int, int, int], attention: str = "softmax"):
        super().__init__()
        c1, c2, c3 = channels
        self.blocks = nn.ModuleList(MSFFBlock(2 * c, attention) for c in channels)
        self.top_down32 = nn.Conv2d(c3, c2, 3, padding=1)
        self.top_down21 = nn.Conv2d(c2, c1, 3, padding=1)
        self.spatial_attention = SpatialAttention()

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        f1, f2, f3 = (block(x) for block, x in zip(self.blocks, inputs, strict=True))
        f2 = f2 + self.top_down32(upsample_like(f3, f2))
        f1 = f1 + self.top_down21(upsample_like(f2, f1))
        # m3 = sam(x3), m2 = sam(x2) * up(m3), m1 = sam(x1) * up(m2); outputs f_l * m_l.
        return ops.fuse_pyramid([f1, f2, f3], [self.spatial_attention(x) for x in inputs])


class GuidedProjection(nn.Module):
    """MSFF's ablation and the light preset's fusion: a 1x1 convolution per level from the guided input
    (``2 * C_l`` channels) to ``C_l``."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.levels = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for c in channels)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.levels, inputs, strict=True)]
