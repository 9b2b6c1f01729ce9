"""MobileNetV2 at width 0.35 for 32x32 inputs (Sandler et al., CVPR 2018), on torchvision's.

Built by ``torchvision.models.mobilenet_v2(weights=None, width_mult=0.35, ...)`` with the usual
CIFAR adaptation: the stem conv and the first 24-channel stage use stride 1 instead of 2, so a
32x32 input reaches the last stage at 4x4 instead of 1x1. The 1280-channel last layer is kept
(torchvision does not shrink it for width < 1).

torchvision's head is ``Sequential(Dropout(0.2), Linear)``; here ``classifier`` is that Linear and
the dropout is the last step of ``forward_features`` (the identity in eval mode), so training
behaves as torchvision's network does.
"""

from __future__ import annotations

from torch import Tensor, nn

from fl.errors import ConfigError
from fl.models._api import ZooModel, register_model

WIDTH = 0.35

# torchvision's (expand ratio t, channels c, repeats n, stride s), with the 24-channel stage's
# stride set to 1 for 32x32 inputs.
CIFAR_INVERTED_RESIDUAL_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class MobileNetV2Cifar(ZooModel):
    """torchvision's MobileNetV2 ``features`` with a stride-1 stem, pooled, dropout, ``classifier``."""

    def __init__(self, *, num_classes: int, in_channels: int = 3, width_mult: float = WIDTH, dropout: float = 0.2):
        super().__init__()
        import torchvision  # imported on first build: it costs ~1 s at start-up

        network = torchvision.models.mobilenet_v2(
            weights=None,
            width_mult=width_mult,
            num_classes=num_classes,
            inverted_residual_setting=CIFAR_INVERTED_RESIDUAL_SETTING,
            dropout=dropout,
        )
        stem = network.features[0][0]
        if in_channels == stem.in_channels:
            stem.stride = (1, 1)
        else:
            stem = nn.Conv2d(in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(stem.weight, mode="fan_out")  # as torchvision initialises convs
            network.features[0][0] = stem
        self.features = network.features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = network.classifier[0]
        self.classifier = network.classifier[1]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.dropout(self.flatten(self.pool(self.features(x))))


@register_model("mobilenetv2_035")
def mobilenetv2_035(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.2
) -> MobileNetV2Cifar:
    """MobileNetV2 x0.35 with the CIFAR stem; ``dropout`` is applied before the classifier."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError("model.dropout", f"must be a probability in [0, 1), got {dropout!r}")
    return MobileNetV2Cifar(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
