"""ResNet blocks for the trainable parts of reverse distillation: encoder blocks (torchvision's) for the
one-class bottleneck and their transposed twins for the student decoder (RD4AD's ``de_resnet``)."""

from typing import Any

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


def _bn_relu(conv: nn.Module, channels: int, relu: bool = True) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels)] + ([nn.ReLU(inplace=True)] if relu else [])


def _up_or_same(in_channels: int, out_channels: int, upsample: bool) -> nn.Module:
    if upsample:
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


class DeBottleneck(nn.Module):
    """Bottleneck whose 3x3 conv is a 2x2 stride-2 transposed conv when it upsamples."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, width_mult: int = 1, upsample: bool = False):
        super().__init__()
        width = planes * width_mult
        out_channels = planes * self.expansion
        self.body = nn.Sequential(
            *_bn_relu(nn.Conv2d(in_channels, width, 1, bias=False), width),
            *_bn_relu(_up_or_same(width, width, upsample), width),
            *_bn_relu(nn.Conv2d(width, out_channels, 1, bias=False), out_channels, relu=False),
        )
        self.shortcut = _shortcut(in_channels, out_channels, upsample)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class DeBasicBlock(nn.Module):
    """Basic block whose first conv is a 2x2 stride-2 transposed conv when it upsamples."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, width_mult: int = 1, upsample: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            *_bn_relu(_up_or_same(in_channels, planes, upsample), planes),
            *_bn_relu(nn.Conv2d(planes, planes, 3, padding=1, bias=False), planes, relu=False),
        )
        self.shortcut = _shortcut(in_channels, planes, upsample)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, upsample: bool) -> nn.Module:
    if upsample:
        return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False),
                             nn.BatchNorm2d(out_channels))
    if in_channels != out_channels:
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
    return nn.Identity()


ENCODER_BLOCKS: dict[str, Any] = {"bottleneck": Bottleneck, "basic": BasicBlock}
DECODER_BLOCKS: dict[str, Any] = {"bottleneck": DeBottleneck, "basic": DeBasicBlock}


def encoder_stage(block: str, in_channels: int, out_channels: int, blocks: int, width_mult: int) -> nn.Sequential:
    """``blocks`` torchvision blocks producing ``out_channels``, the first with stride 2."""
    cls = ENCODER_BLOCKS[block]
    planes = out_channels // cls.expansion
    downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
                               nn.BatchNorm2d(out_channels))
    kwargs = {"base_width": 64 * width_mult} if block == "bottleneck" else {}
    layers = [cls(in_channels, planes, stride=2, downsample=downsample, **kwargs)]
    layers += [cls(out_channels, planes, **kwargs) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def decoder_stage(block: str, in_channels: int, out_channels: int, blocks: int, width_mult: int) -> nn.Sequential:
    """``blocks`` decoder blocks producing ``out_channels``, the first upsampling x2."""
    cls = DECODER_BLOCKS[block]
    planes = out_channels // cls.expansion
    layers = [cls(in_channels, planes, width_mult, upsample=True)]
    layers += [cls(out_channels, planes, width_mult) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)
