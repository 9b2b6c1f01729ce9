"""The small edge CNN: the project's benchmark workload ("545k-param CNN").

Three 3x3 conv layers (32/64/128 channels, each followed by ReLU and a 2x2 max-pool), a hidden
fully connected layer and the linear classifier. At 32x32x3 and 10 classes it has 546,238
parameters; the flatten size follows ``image_size`` (28x28x1 MNIST gives a 128*3*3 flatten).
"""

from __future__ import annotations

from torch import Tensor, nn

from fl.errors import ConfigError
from fl.models._api import ZooModel, register_model
from fl.models._utils import pooled_size, scaled

CONV_CHANNELS = (32, 64, 128)


def _conv_relu_pool(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]


class SmallCNN(ZooModel):
    """conv3x3-ReLU-pool x3, flatten, fc-ReLU, classifier. PyTorch's default initialisation."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        channels: tuple[int, ...] = CONV_CHANNELS,
        hidden: int = 220,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for out_channels in channels:
            layers += _conv_relu_pool(previous, out_channels)
            previous = out_channels
        self.features = nn.Sequential(*layers)
        side = pooled_size(image_size, len(channels))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(previous * side * side, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.relu(self.fc(self.flatten(self.features(x))))


@register_model("cnn_small")
def cnn_small(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0, hidden: int = 220
) -> SmallCNN:
    """The ~545k-parameter edge CNN; ``width`` scales the conv channels, ``hidden`` the fc layer."""
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ConfigError("model.hidden", f"must be a positive integer, got {hidden!r}")
    channels = tuple(scaled(c, width) for c in CONV_CHANNELS)
    return SmallCNN(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, channels=channels, hidden=hidden
    )
