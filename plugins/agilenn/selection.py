"""Initial channel selection (Huang and Gao, MobiCom 2022, section 4.2, Algorithm 1).

With the pretrained extractor and reference, count for every channel how many samples have it
among their k most important channels; rank channels by that count (descending, ties by index)
and permute the extractor's last filters so that the top-ranked channels come first. The local
head then takes channels [0, k) from the start of AgileNN training, which is where the skewness
loss pushes the importance.

The permutation moves, together, the last pointwise conv's output filters and its BatchNorm
entries (the extractor's outputs) and the reference's first conv input channels, so the
reference computes exactly the same function of the permuted features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from plugins.agilenn.network import AgileNet


def topk_counts(importance: Tensor, k: int) -> Tensor:
    """How many samples hold each channel among their top-k importances, [C] int64."""
    top = importance.topk(k, dim=1).indices
    return torch.bincount(top.flatten(), minlength=importance.shape[1])


def ranking(counts: Tensor) -> Tensor:
    """Channels by count, descending; ties by channel index (a stable sort)."""
    return torch.sort(-counts.to(torch.float64), stable=True).indices


@torch.no_grad()
def permute_channels(model: AgileNet, order: Tensor) -> None:
    """Make channel ``order[i]`` the extractor's i-th output, in place (Algorithm 1, last step)."""
    last = model.extractor.last
    order = order.long().to(last.pointwise.weight.device)
    last.pointwise.weight.copy_(last.pointwise.weight[order])
    bn = last.norm
    for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        tensor.copy_(tensor[order])
    first = model.reference.first
    first.weight.copy_(first.weight[:, order])
