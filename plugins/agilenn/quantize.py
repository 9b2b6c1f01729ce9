"""Learned-centroid quantization of the remote features with a straight-through estimator
(Huang and Gao, MobiCom 2022, section 5: "the features to be offloaded are quantized ... with
trainable centroids", 8 centroids = 3 bits by default).

Forward: every value becomes its nearest centroid, ``q = c[idx(x)]``. Backward (straight
through): ``q = c[idx] + x - stopgrad(x)``, so dq/dx = 1 (the remote head's gradient reaches the
extractor unchanged) and dq/dc_j = [idx == j] (each centroid moves with the gradient summed over
the values it holds).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CentroidQuantizer(nn.Module):
    def __init__(self, levels: int = 8, init_max: float = 3.0):
        super().__init__()
        self.levels = int(levels)
        self.centroids = nn.Parameter(torch.linspace(0.0, init_max, self.levels))

    def codebook(self) -> Tensor:
        """The centroids in ascending order (the order indices refer to)."""
        return torch.sort(self.centroids.detach()).values

    def indices(self, x: Tensor) -> Tensor:
        """Nearest-centroid index of every value, as uint8 (ties go to the lower centroid)."""
        book = self.codebook()
        return torch.bucketize(x.detach().contiguous(), (book[1:] + book[:-1]) / 2).to(torch.uint8)

    def forward(self, x: Tensor) -> Tensor:
        ordered, order = torch.sort(self.centroids)
        idx = torch.bucketize(x.detach().contiguous(), (ordered[1:] + ordered[:-1]).detach() / 2)
        return ordered[idx] + (x - x.detach())  # exactly c[idx]; d/dx = 1

    @staticmethod
    def dequantize(indices: Tensor, codebook: Tensor) -> Tensor:
        return codebook[indices.long()]
