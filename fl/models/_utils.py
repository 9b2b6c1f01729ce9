"""Small helpers shared by the zoo's networks."""

from __future__ import annotations

from fl.errors import ConfigError


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least one channel."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ConfigError("model.width", f"must be a positive number, got {width!r}")
    return max(1, int(round(channels * width)))


def pooled_size(image_size: int, num_pools: int) -> int:
    """Side length after ``num_pools`` 2x2 max-pools with floor rounding (``nn.MaxPool2d(2)``)."""
    for _ in range(num_pools):
        image_size //= 2
    if image_size < 1:
        raise ConfigError("model.image_size", f"too small for {num_pools} 2x2 poolings; use at least {2 ** num_pools}")
    return image_size
