"""The AgileNN split network (Huang and Gao, "Real-time Neural Network Inference on Extremely Weak
Devices: Agile Offloading with Explainable AI", MobiCom 2022, section 3 and Figure 4).

    x -> extractor E (two separable convs, ``channels`` = 24 output channels)
      -> features f = E(x), channels ordered so that the first k = round(k_ratio * channels) are
         the important ones (section 4.2; ``plugins.agilenn.selection`` permutes them there)
      -> local head   L(f[:, :k])            GAP + linear + BatchNorm on the logits, on the device
      -> remote head  R(Q(f[:, k:]))         quantized (``quantize.CentroidQuantizer``), coded
                                             (``fl.payload``), a MobileNetV2 body on the server
      -> logits = alpha * L + (1 - alpha) * R,   alpha = sigmoid(w / T)   (section 5, Eq. 4)

A frozen ``reference`` network (a small CNN on all ``channels`` features) is part of the module:
the importance of each feature channel is the integrated gradient of its true-label loss
(``plugins.agilenn.importance``). It is pretrained with the extractor and then frozen (section
4.1); ``reference_logits`` is that pretraining path.

``plain`` networks (``split=False``) are "the same network trained without the split": the
extractor followed by the remote head on all channels, unquantized, for the accuracy comparison.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fl.errors import ConfigError
from fl.models._api import ZooModel, register_model
from plugins.agilenn.quantize import CentroidQuantizer

# MobileNetV2 stages (expand t, channels c, repeats n, stride s) for the 8x8 feature maps the
# extractor gives a 32x32 image; the body ends at 2x2.
REMOTE_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 2, 2], [6, 64, 2, 2], [6, 96, 1, 1]]


def top_k(channels: int, k_ratio: float) -> int:
    """k = round(k_ratio * channels), at least 1 and at most channels - 1 (both sides non-empty)."""
    return min(max(int(round(k_ratio * channels)), 1), channels - 1)


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 (stride ``stride``) + BN + ReLU, then pointwise 1x1 + BN + ReLU (MobileNetV1)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    @property
    def pointwise(self) -> nn.Conv2d:
        return self[3]

    @property
    def norm(self) -> nn.BatchNorm2d:
        return self[4]


class Extractor(nn.Sequential):
    """The device's feature extractor: two separable convs, each with stride 2 (32x32 -> 8x8)."""

    def __init__(self, in_channels: int, channels: int, hidden: int = 32):
        super().__init__(SeparableConv(in_channels, hidden, 2), SeparableConv(hidden, channels, 2))

    @property
    def last(self) -> SeparableConv:
        return self[1]


class LocalHead(nn.Module):
    """Global average pooling + one linear layer on the top-k channels, + BatchNorm on the logits.

    The BatchNorm is the authors' (their released code's local predictor is GAP, Dense,
    BatchNormalization; the paper does not mention it): it holds the local logits at the scale of
    the remote ones. Without it the confident remote head takes the combined cross-entropy's
    gradient to zero before the local head has learned: on MNIST the local logits' spread over
    samples stayed at 0.04-0.09 against the remote's 4-5 and local-only accuracy at 0.11-0.18
    over 4 epochs; with it, spread 1.1 and accuracy 0.31-0.36 (measured, central training).
    """

    def __init__(self, k: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(k, num_classes)
        self.norm = nn.BatchNorm1d(num_classes)

    def forward(self, f: Tensor) -> Tensor:
        return self.norm(self.linear(f.mean((2, 3))))


class RemoteHead(nn.Module):
    """A MobileNetV2 body (torchvision's inverted residuals) on the remote channels, GAP, linear."""

    def __init__(self, cin: int, num_classes: int, width: float = 1.0, last: int = 256):
        super().__init__()
        from torchvision.models.mobilenetv2 import InvertedResidual

        def ch(c: int) -> int:
            return max(8, int(math.ceil(c * width / 8)) * 8)

        layers: list[nn.Module] = [nn.Conv2d(cin, ch(32), 1, bias=False), nn.BatchNorm2d(ch(32)), nn.ReLU6(inplace=True)]
        c = ch(32)
        for t, cout, n, s in REMOTE_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(c, ch(cout), s if i == 0 else 1, t))
                c = ch(cout)
        layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def features(self, f: Tensor) -> Tensor:
        return self.body(f).mean((2, 3))

    def forward(self, f: Tensor) -> Tensor:
        return self.classifier(self.features(f))


class Reference(nn.Module):
    """The frozen importance reference: conv 3x3 -> conv 3x3 (stride 2) -> GAP -> linear."""

    def __init__(self, cin: int, num_classes: int, hidden: int = 48):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 2, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.linear = nn.Linear(hidden, num_classes)

    @property
    def first(self) -> nn.Conv2d:
        return self.body[0]

    def forward(self, f: Tensor) -> Tensor:
        return self.linear(self.body(f).mean((2, 3)))


class AgileNet(ZooModel):
    """The split network; ``forward(x)`` gives the combined logits (``split_outputs`` all parts).

    ``classifier``/``forward_features`` (the zoo contract) are the remote head's last layer and
    its input, so that zoo-wide tools see the server-side classifier.
    """

    def __init__(self, *, num_classes: int, in_channels: int = 3, channels: int = 24, k_ratio: float = 0.2,
                 levels: int = 8, temperature: float = 5.0, remote_width: float = 1.0, split: bool = True):
        super().__init__()
        self.channels, self.split = channels, split
        self.k = top_k(channels, k_ratio) if split else 0
        self.temperature = float(temperature)
        self.extractor = Extractor(in_channels, channels)
        self.reference = Reference(channels, num_classes)
        self.remote = RemoteHead(channels - self.k, num_classes, remote_width)
        if split:
            self.local = LocalHead(self.k, num_classes)
            self.quantizer = CentroidQuantizer(levels)
            self.alpha_w = nn.Parameter(torch.zeros(()))  # alpha = sigmoid(w / T) = 0.5 at the start
        self.freeze_reference(False)

    # -- zoo contract ------------------------------------------------------------------------

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        return self.remote.classifier

    def forward_features(self, x: Tensor) -> Tensor:
        f = self.extractor(x)
        return self.remote.features(self.quantizer(f[:, self.k:]) if self.split else f)

    # -- the split -----------------------------------------------------------------------------

    @property
    def alpha(self) -> Tensor:
        return torch.sigmoid(self.alpha_w / self.temperature)

    def combine(self, local: Tensor, remote: Tensor) -> Tensor:
        """Eq. 4: alpha * local + (1 - alpha) * remote."""
        a = self.alpha
        return a * local + (1 - a) * remote

    def split_outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(features f, local logits, remote logits, combined logits)."""
        f = self.extractor(x)
        local = self.local(f[:, :self.k])
        remote = self.remote(self.quantizer(f[:, self.k:]))
        return f, local, remote, self.combine(local, remote)

    def local_logits(self, x: Tensor) -> Tensor:
        """The device's own forward pass: the extractor, then the local head on the first k channels."""
        return self.local(self.extractor(x)[:, :self.k])

    def forward(self, x: Tensor) -> Tensor:
        if not self.split:
            return self.remote(self.extractor(x))
        return self.split_outputs(x)[3]

    def reference_logits(self, x: Tensor) -> Tensor:
        """The pretraining path: the reference on the extractor's features (section 4.1)."""
        return self.reference(self.extractor(x))

    # -- the reference is frozen once pretrained ----------------------------------------------

    def freeze_reference(self, frozen: bool = True) -> None:
        self.reference_frozen = frozen
        self.reference.requires_grad_(not frozen)
        if frozen:
            self.reference.eval()

    def train(self, mode: bool = True) -> "AgileNet":
        super().train(mode)
        if self.reference_frozen:  # BN statistics of a frozen reference never move
            self.reference.eval()
        return self

    def device_parameters(self) -> list[nn.Parameter]:
        """What the device trains: the extractor, the local head, alpha's w and the centroids."""
        return [*self.extractor.parameters(), *self.local.parameters(), self.alpha_w, *self.quantizer.parameters()]

    def device_state_names(self) -> list[str]:
        """State keys that live on the device in split learning (the reference included: it is
        frozen but the device computes the importance with it)."""
        prefixes = ("extractor.", "local.", "quantizer.", "reference.", "alpha_w")
        return [n for n in self.state_dict() if n.startswith(prefixes)]


@register_model("agilenn")
def agilenn(*, num_classes: int, in_channels: int = 3, image_size: int = 32, channels: int = 24,
            k_ratio: float = 0.2, levels: int = 8, temperature: float = 5.0, remote_width: float = 1.0,
            split: bool = True) -> AgileNet:
    """AgileNN's split network (``split=False``: the same extractor + remote head, unsplit)."""
    if not isinstance(channels, int) or channels < 2:
        raise ConfigError("model.channels", f"must be an integer >= 2, got {channels!r}")
    if not 0 < float(k_ratio) < 1:
        raise ConfigError("model.k_ratio", f"must be in (0, 1), got {k_ratio!r}")
    if not isinstance(levels, int) or not 2 <= levels <= 256:
        raise ConfigError("model.levels", f"must be an integer in [2, 256], got {levels!r}")
    if float(temperature) <= 0:
        raise ConfigError("model.temperature", f"must be > 0, got {temperature!r}")
    return AgileNet(num_classes=num_classes, in_channels=in_channels, channels=channels, k_ratio=float(k_ratio),
                    levels=levels, temperature=float(temperature), remote_width=float(remote_width), split=bool(split))
