"""Magnitude sparsity shared by FedDST-like training (strategies/feddst.py) and the server's sparse
pretraining of a comparison's FedDST arm (fl/delta/pair.py): per-layer budgets, top-k masks.

ERK allocation (Evci et al., "Rigging the Lottery", ICML 2020, Sec. 3, as in RigL's code): the
prunable tensors are the floating tensors with two or more dimensions (conv and linear weights,
the first conv and the classifier included); biases and normalization parameters stay dense. A
tensor of shape (n_1, ..., n_d) with N_l = prod n_j entries gets density
    d_l = eps * (n_1 + ... + n_d) / (n_1 * ... * n_d)
with eps such that sum_l d_l N_l = (1 - S) sum_l N_l. A tensor whose d_l would exceed 1 is made
dense (d_l = 1, as are the tensors named in ``dense_layers``) and eps is solved again over the rest
until none exceeds 1. K_l = d_l N_l rounded by largest remainder, so the K_l add up to
round((1 - S) sum_l N_l) exactly.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

from fl.errors import ConfigError

State = dict[str, torch.Tensor]


def prunable_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The tensors ERK allocates over: floating tensors with two or more dimensions."""
    return {name: tuple(t.shape) for name, t in state.items() if t.is_floating_point() and t.dim() >= 2}


def erk_budgets(shapes: Mapping[str, Sequence[int]], sparsity: float, dense_layers: Iterable[str] = (), *,
                key: str = "strategy.dense_layers") -> dict[str, int]:
    """K_l per prunable tensor: the ERK allocation above; ``key`` names the option of
    ``dense_layers`` in errors."""
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    score = {name: sum(shape) / numel[name] for name, shape in shapes.items()}
    dense = set()
    for layer in dense_layers:
        names = {n for n in shapes if n == layer or n == f"{layer}.weight"}
        if not names:
            raise ConfigError(key, f"{layer!r} names no conv/linear weight; they are: {', '.join(shapes)}")
        dense |= names
    target = round((1.0 - sparsity) * sum(numel.values()))
    while True:
        rest = target - sum(numel[name] for name in dense)
        if rest < 0:
            raise ConfigError(key, f"the dense layers alone exceed the budget of sparsity {sparsity}")
        free = [name for name in shapes if name not in dense]
        if not free:
            break
        eps = rest / sum(score[name] * numel[name] for name in free)
        over = {name for name in free if eps * score[name] > 1.0}
        if not over:
            break
        dense |= over
    budgets = {name: numel[name] for name in dense}
    if free:
        exact = {name: eps * score[name] * numel[name] for name in free}
        floors = {name: min(int(math.floor(v)), numel[name]) for name, v in exact.items()}
        left = rest - sum(floors.values())
        by_remainder = sorted(free, key=lambda name: -(exact[name] - floors[name]))  # stable: ties in order
        for name in by_remainder[:left]:
            floors[name] += 1
        budgets.update(floors)
    return {name: budgets[name] for name in shapes}


def top_k_mask(magnitude: torch.Tensor, holders: torch.Tensor, k: int) -> torch.Tensor:
    """The k coordinates of largest magnitude; ties by larger holder weight, then lower flat index."""
    flat_mag, flat_hold = magnitude.reshape(-1), holders.reshape(-1)
    order = torch.sort(flat_hold, descending=True, stable=True).indices
    order = order[torch.sort(flat_mag[order], descending=True, stable=True).indices]
    mask = torch.zeros(flat_mag.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(magnitude.shape)


def apply_mask(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> State:
    return {name: t * masks[name] if name in masks else t for name, t in state.items()}


def magnitude_masks(state: Mapping[str, torch.Tensor], budgets: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Each sparse layer's K_l coordinates of largest |w| (ties: lower flat index); layers whose
    budget is their whole size carry no mask."""
    return {name: top_k_mask(state[name].float().abs(), torch.zeros(state[name].shape), k)
            for name, k in budgets.items() if k < state[name].numel()}
