"""In-memory image sets: uint8 pixels resident once per process, normalized per batch on read.

Pixels are kept as a uint8 tensor [N, C, H, W] (50,000 CIFAR-sized images take about 150 MB);
`get` gathers a batch and converts it to normalized float32, so no float copy of the whole set is
ever held. Reads only gather from the uint8 tensor, so any number of threads may call `get` at once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class ImageSet:
    """Images and labels held in memory; `get(indices)` returns one normalized batch."""

    def __init__(
        self,
        pixels: torch.Tensor,
        labels: np.ndarray,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "",
    ):
        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise ValueError(f"pixels must be a uint8 tensor [N, C, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
        if pixels.shape[2] != pixels.shape[3]:
            raise ValueError(f"images must be square, got {tuple(pixels.shape[2:])}")
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if len(labels) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(labels)} labels")
        self._init_meta(labels, num_classes, pixels.shape[1], pixels.shape[2], mean, std, name)
        self._pixels = pixels.contiguous()
        self._array = self._pixels.numpy()

    def _init_meta(self, labels, num_classes, channels, image_size, mean, std, name) -> None:
        # Shared with subclasses that produce their pixels lazily (see fl.data.synthetic).
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} entries, got {len(mean)}/{len(std)}")
        self.labels = labels
        self.labels.setflags(write=False)
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name
        self._scale = (np.array(self.std, dtype=np.float32) * 255).reshape(1, -1, 1, 1)
        self._shift = (np.array(self.mean, dtype=np.float32) * 255).reshape(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, classes={self.num_classes}, "
                f"shape={self.channels}x{self.image_size}x{self.image_size})")

    def pixels(self, indices: np.ndarray) -> torch.Tensor:
        """Raw uint8 images [B, C, H, W] (for overlays and statistics)."""
        return torch.from_numpy(self._gather(_as_index(indices, len(self))))

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float32 images [B, C, H, W] and int64 labels [B]."""
        idx = _as_index(indices, len(self))
        # Gathered and normalized with numpy: a small batch stays on the calling thread instead of
        # waking torch's intra-op pool, which costs milliseconds when the cores are busy.
        x = (self._gather(idx).astype(np.float32) - self._shift) / self._scale
        return torch.from_numpy(x), torch.from_numpy(self.labels[idx])

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        return self._array[idx]

    def subset(self, indices: np.ndarray, name: str | None = None) -> "ImageSet":
        """A new set holding copies of the chosen images, with this set's normalization."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.pixels(idx), self.labels[idx], self.num_classes, self.mean, self.std,
                        self.name if name is None else name)


def channel_stats(pixels: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of uint8 images [N, C, H, W], computed in chunks."""
    channels = pixels.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, pixels.shape[0], chunk):
        block = pixels[start:start + chunk].to(torch.float64).div_(255.0)
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square().sum(dim=(0, 2, 3))
    count = pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _as_index(indices, n: int) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.numpy()
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"index out of range for a set of {n} images")
    return idx
