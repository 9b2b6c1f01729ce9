"""The model zoo: ``get_model(name, num_classes=..., in_channels=..., image_size=...)``.

Every model is a :class:`ZooModel`: ``forward_features(x) -> [B, D]``, ``classifier: nn.Linear``
and ``forward(x) == classifier(forward_features(x))`` (see ``fl.models._api``).

Registered: ``cnn_small`` (the ~545k-parameter edge CNN), ``vgg8/11/16`` (CIFAR VGG-BN, ``width``),
``resnet8/20/56`` (CIFAR ResNet, option-B shortcut by default, ``width``), ``mobilenetv2_035``
(torchvision's MobileNetV2 x0.35 with a CIFAR stem) and ``tv_<name>`` torchvision networks.
"""

from fl.models._api import MODELS, ZooModel, describe, get_model, list_models, model_profile, register_model

# Importing the model modules registers their builders.
from fl.models import cnn, mobilenet, resnet, tv, vgg  # noqa: E402,F401  isort: skip
from fl.models.tv import register_torchvision  # noqa: E402

# DELTA's entries sit above the zoo (they build from it), so they are declared, not imported.
MODELS.declare("delta_fused", "fl.delta.models")
MODELS.declare("pretrained", "fl.delta.models")

__all__ = [
    "MODELS",
    "ZooModel",
    "describe",
    "get_model",
    "list_models",
    "model_profile",
    "register_model",
    "register_torchvision",
]
