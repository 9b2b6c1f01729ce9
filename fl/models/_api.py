"""The model registry and what every zoo network promises.

Contract (relied on by geometry monitoring, DELTA with the base classifier and feature
importance): every network built by :func:`get_model` is a :class:`ZooModel`, so

* ``model.forward_features(x)`` returns ``[B, D]``, the vector that enters the final layer;
* ``model.classifier`` is that final layer, an ``nn.Linear(D, num_classes)``;
* ``model(x) == model.classifier(model.forward_features(x))``.

Builders are keyword-only functions ``(*, num_classes, in_channels, image_size, **options)``
registered by name, as in ``torchvision.models``; ``get_model`` rejects options the builder does
not declare, naming the offending config key (``model.<option>``).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch_pruning
from torch import Tensor, nn

from fl.errors import ConfigError
from fl.registry import Registry

ModelBuilder = Callable[..., "ZooModel"]

MODELS: Registry[ModelBuilder] = Registry("model", "model.name")

# Every builder receives these from get_model; anything else is a model-specific option.
COMMON_ARGS = ("num_classes", "in_channels", "image_size")


class ZooModel(nn.Module):
    """Base of every zoo network: a feature extractor followed by one linear classifier."""

    classifier: nn.Linear

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled, flattened features ``[B, D]`` that enter ``self.classifier``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder under ``name``; a second registration of the name is an error."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        params = inspect.signature(builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        missing = [arg for arg in COMMON_ARGS if arg not in params and not takes_any]
        if missing:
            raise TypeError(f"model builder {name!r} must accept keyword arguments {missing}")
        return MODELS.register(name)(builder)

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


def get_model(
    name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs
) -> ZooModel:
    """Build the registered model ``name``; unknown names and options raise ConfigError.

    Initialisation draws from torch's global generator: seed it (``torch.manual_seed``) before
    calling for a reproducible model; nothing here reseeds.
    """
    builder = MODELS.get(name)
    _check_options(name, builder, kwargs)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key}", f"must be a positive integer, got {value!r}")
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def model_profile(model: nn.Module, in_channels: int = 3, image_size: int = 32) -> dict[str, int]:
    """Parameters and MACs of one forward pass on a single ``in_channels x image_size^2`` image.

    Counted by ``torch_pruning.utils.count_ops_and_params`` (a ptflops-style counter run on a
    deep copy in eval mode). Its first value is multiply-accumulates, not 2x FLOPs: each conv and
    linear layer counts its MACs plus one per bias element, BatchNorm two per element, ReLU/ReLU6,
    GELU and pooling one per element. Operations outside its module table are not counted:
    residual additions, functional calls, SiLU/Hardswish/Hardsigmoid and squeeze-excitation
    products. ``params`` is ``sum(p.numel() for p in model.parameters())``.
    """
    reference = next(model.parameters())
    example = torch.zeros(1, in_channels, image_size, image_size, device=reference.device, dtype=reference.dtype)
    macs, params = torch_pruning.utils.count_ops_and_params(model, example)
    return {"params": int(params), "macs": int(macs)}


def describe(name: str, model: nn.Module, *, in_channels: int = 3, image_size: int = 32) -> str:
    """One line for logs, e.g. ``"cnn_small: 546,238 params, 10.9 MMACs"``."""
    profile = model_profile(model, in_channels, image_size)
    return f"{name}: {profile['params']:,} params, {_format_macs(profile['macs'])}"


# --- helpers -------------------------------------------------------------------------------------


def _check_options(name: str, builder: ModelBuilder, kwargs: dict) -> None:
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in COMMON_ARGS]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        choices = ", ".join(allowed) if allowed else "none"
        raise ConfigError(f"model.{unknown[0]}", f"unknown option for model {name!r}; allowed options: {choices}")


def _format_macs(macs: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.1f} {unit}MACs"
    return f"{macs} MACs"
