"""CIFAR-style VGG with BatchNorm (Simonyan & Zisserman 2015, as adapted in the usual CIFAR repos).

conv3x3-BN-ReLU stages separated by 2x2 max-pools, global average pooling and a single linear
classifier. Differences from those repos, all deliberate:

* convs carry no bias (the BatchNorm after each one makes it redundant), so vgg16 at width 1 has
  14,724,042 parameters instead of 14,728,266;
* the pools use ``ceil_mode=True`` so that any ``image_size`` works (28x28 MNIST: 28-14-7-4-2-1);
  at 32x32 every pool divides evenly and the network is unchanged;
* ``AdaptiveAvgPool2d(1)`` before the classifier, so the feature vector is ``[B, 512 * width]``
  for any input size.

``width`` multiplies every conv width (HeteroFL-style configurable widths).
"""

from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor, nn

from fl.models._api import ZooModel, register_model
from fl.models._utils import scaled

# "M" is a 2x2 max-pool; numbers are conv widths at width 1.
CFGS: dict[str, list[Union[int, str]]] = {
    "vgg8": [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_layers(cfg: Sequence[Union[int, str]], *, in_channels: int, width: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    previous = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            out_channels = scaled(int(item), width)
            layers += [
                nn.Conv2d(previous, out_channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            previous = out_channels
    return nn.Sequential(*layers)


class VGG(ZooModel):
    """``features`` (the conv stack), global average pool, flatten, ``classifier``."""

    def __init__(self, features: nn.Sequential, *, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(feature_dim, num_classes)
        # torchvision's VGG initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.flatten(self.pool(self.features(x)))


def _vgg(cfg: str, *, num_classes: int, in_channels: int, width: float) -> VGG:
    features = make_layers(CFGS[cfg], in_channels=in_channels, width=width)
    last_width = [item for item in CFGS[cfg] if item != "M"][-1]
    return VGG(features, feature_dim=scaled(int(last_width), width), num_classes=num_classes)


@register_model("vgg8")
def vgg8(*, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0) -> VGG:
    """VGG-8 (5 convs; the 3 fully connected layers of the original reduced to one)."""
    return _vgg("vgg8", num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("vgg11")
def vgg11(*, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0) -> VGG:
    """VGG-11 with BatchNorm (8 convs + linear classifier)."""
    return _vgg("vgg11", num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("vgg16")
def vgg16(*, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0) -> VGG:
    """VGG-16 with BatchNorm (13 convs + linear classifier)."""
    return _vgg("vgg16", num_classes=num_classes, in_channels=in_channels, width=width)
