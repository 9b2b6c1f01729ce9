"""torchvision classification networks as zoo models, registered as ``tv_<torchvision name>``.

Always built with ``weights=None`` (random initialisation; nothing is downloaded). These are
ImageNet designs meant for about 224x224 inputs: a stride-2 stem (usually with a max-pool)
leaves a 32x32 image at 1x1 by the last stage, so they run at CIFAR sizes but are not tuned for
them.

The wrapper splits the network at its last ``nn.Linear``, which is the last operation of each
registered network: that layer becomes ``classifier`` and is replaced by ``nn.Identity`` inside
``body``, so ``forward_features`` is everything before it (for MobileNetV3 that includes the
Linear-Hardswish-Dropout of its head; dropout is the identity in eval mode). ``in_channels``
other than 3 replaces the first conv with a freshly initialised one of the same shape.
Register another torchvision network with ``register_torchvision("<name>")`` after checking that
its last Linear is its last operation.
"""

from __future__ import annotations

from torch import Tensor, nn

from fl.models._api import ZooModel, register_model

TORCHVISION_MODELS = ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "efficientnet_b0")


def _last_module_name(network: nn.Module, kind: type[nn.Module]) -> str:
    names = [name for name, module in network.named_modules() if isinstance(module, kind)]
    if not names:
        raise ValueError(f"{type(network).__name__} has no {kind.__name__}")
    return names[-1]


def _first_module_name(network: nn.Module, kind: type[nn.Module]) -> str:
    return next(name for name, module in network.named_modules() if isinstance(module, kind))


def _replace(network: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(network.get_submodule(parent), child, module)


class TorchvisionClassifier(ZooModel):
    """A torchvision network with its final Linear lifted out as ``classifier``."""

    def __init__(self, network: nn.Module, *, in_channels: int = 3):
        super().__init__()
        head = _last_module_name(network, nn.Linear)
        self.classifier = network.get_submodule(head)
        _replace(network, head, nn.Identity())
        stem_name = _first_module_name(network, nn.Conv2d)
        stem = network.get_submodule(stem_name)
        if stem.in_channels != in_channels:
            _replace(network, stem_name, _fresh_conv_like(stem, in_channels))
        self.body = network

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)


def _fresh_conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    fresh = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(fresh.weight, mode="fan_out", nonlinearity="relu")
    if fresh.bias is not None:
        nn.init.zeros_(fresh.bias)
    return fresh


def register_torchvision(tv_name: str) -> None:
    """Register ``torchvision.models.get_model(tv_name)`` as the zoo model ``tv_<tv_name>``."""

    def builder(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> TorchvisionClassifier:
        import torchvision  # imported on first build: it costs ~1 s at start-up

        network = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
        return TorchvisionClassifier(network, in_channels=in_channels)

    builder.__name__ = builder.__qualname__ = f"tv_{tv_name}"
    builder.__doc__ = f"torchvision's {tv_name} (weights=None); image_size is not used."
    register_model(f"tv_{tv_name}")(builder)


for _name in TORCHVISION_MODELS:
    register_torchvision(_name)
