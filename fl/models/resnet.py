"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

A 3x3 stem with 16 channels, three stages of ``n = (depth - 2) / 6`` basic blocks with 16/32/64
channels (the first block of stages 2 and 3 halves the resolution), global average pooling and
a linear classifier; ``width`` multiplies every channel count.

Shortcut: option B by default, a 1x1 conv + BatchNorm projection where the shape changes and
identity elsewhere. It is what torch-pruning's DependencyGraph, Hermes channel masks and nested
channel slices can follow; it adds a few parameters over the paper's option A (resnet20:
272,474 vs 269,722 at 10 classes). Option A (parameter-free: subsample and zero-pad the
channels), as in the paper's CIFAR experiments, is ``shortcut="A"``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from fl.errors import ConfigError
from fl.models._api import ZooModel, register_model
from fl.models._utils import scaled

STAGE_CHANNELS = (16, 32, 64)
SHORTCUTS = ("A", "B")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: take every ``stride``-th pixel and zero-pad the new channels on both sides."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        self.pad_front, self.pad_back = extra // 2, extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


def make_shortcut(in_planes: int, out_planes: int, stride: int, kind: str) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(in_planes, out_planes, stride)
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = make_shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(ZooModel):
    """``features`` = stem, layer1..3 (an ordered ``nn.Sequential``), global average pool, ``classifier``."""

    def __init__(
        self,
        *,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        shortcut: str = "B",
    ):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if shortcut not in SHORTCUTS:
            raise ConfigError("model.shortcut", f"must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}")
        blocks_per_stage = (depth - 2) // 6
        channels = [scaled(c, width) for c in STAGE_CHANNELS]

        stages: OrderedDict[str, nn.Module] = OrderedDict()
        stages["stem"] = nn.Sequential(conv3x3(in_channels, channels[0]), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        in_planes = channels[0]
        for index, planes in enumerate(channels):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if block_index == 0 else 1, shortcut))
                in_planes = planes
            stages[f"layer{index + 1}"] = nn.Sequential(*blocks)
        self.features = nn.Sequential(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_planes, num_classes)

        # torchvision's ResNet initialisation (the classifier keeps nn.Linear's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.flatten(self.pool(self.features(x)))


@register_model("resnet8")
def resnet8(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0, shortcut: str = "B"
) -> CifarResNet:
    """ResNet-8: one basic block per stage."""
    return CifarResNet(depth=8, num_classes=num_classes, in_channels=in_channels, width=width, shortcut=shortcut)


@register_model("resnet20")
def resnet20(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0, shortcut: str = "B"
) -> CifarResNet:
    """ResNet-20: three basic blocks per stage."""
    return CifarResNet(depth=20, num_classes=num_classes, in_channels=in_channels, width=width, shortcut=shortcut)


@register_model("resnet56")
def resnet56(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0, shortcut: str = "B"
) -> CifarResNet:
    """ResNet-56: nine basic blocks per stage."""
    return CifarResNet(depth=56, num_classes=num_classes, in_channels=in_channels, width=width, shortcut=shortcut)
