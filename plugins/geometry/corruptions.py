"""Corrupted inputs in the spirit of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019).

Three of the fifteen corruptions, at severities 1 to 5 with the CIFAR parameters of the
authors' ``make_cifar_c.py``; images are float tensors [B, C, H, W] in [0, 1] (pixels / 255),
corrupted before normalization:

    gaussian_noise  x + N(0, c^2), clipped          c = 0.04, 0.06, 0.08, 0.09, 0.10
    gaussian_blur   Gaussian filter of std c px      c = 0.4, 0.6, 0.7, 0.8, 1.0
    contrast        (x - mean) * c + mean, per image and channel   c = 0.75, 0.5, 0.4, 0.3, 0.15

The noise draws from the generator passed in (seeded by the caller); the blur is separable with edge
replication and a kernel radius of 4 standard deviations (scipy/skimage's default truncation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SEVERITY = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
}
CORRUPTIONS = tuple(SEVERITY)


def corrupt(images: Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """``images`` in [0, 1] with corruption ``name`` at ``severity`` (1..5) applied, in [0, 1]."""
    if name not in SEVERITY:
        raise ValueError(f"unknown corruption {name!r}; allowed: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    c = SEVERITY[name][severity - 1]
    x = images.float()
    if name == "gaussian_noise":
        noisy = x + c * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return noisy.clamp(0.0, 1.0)
    if name == "gaussian_blur":
        return gaussian_blur(x, c).clamp(0.0, 1.0)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0.0, 1.0)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
