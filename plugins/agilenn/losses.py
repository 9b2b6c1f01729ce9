"""AgileNN's training objective (Huang and Gao, MobiCom 2022, section 4.1, Eqs. 2-3).

With I the per-channel importance of a sample ([B, C], ``importance.channel_importance``), k the
local channels (the first k after selection) and rho the required skewness:

    skewness share   s = sum_{c<k} I_c / sum_c I_c
    skewness loss    L_skew = relu(rho - s)                                          (Eq. 2)
    disorder loss    L_dis  = relu((max_{c>=k} I_c - min_{c<k} I_c) / sum_c I_c)      (Eq. 3)
    objective        lambda * CE(combined logits, y) + (1 - lambda) * (L_skew + L_dis)

Both regularizers are zero exactly when the constraint holds (share >= rho; every local channel
at least as important as every remote one) and positive otherwise; they are averaged over the
batch. ``disorder_rate`` is the share of samples whose order is violated (for logs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


def skewness(importance: Tensor, k: int) -> Tensor:
    """Share of the importance held by the first k channels, per sample [B]."""
    return importance[:, :k].sum(1) / (importance.sum(1) + _EPS)


def skewness_loss(importance: Tensor, k: int, rho: float) -> Tensor:
    return F.relu(rho - skewness(importance, k)).mean()


def disorder_loss(importance: Tensor, k: int) -> Tensor:
    gap = importance[:, k:].max(1).values - importance[:, :k].min(1).values
    return F.relu(gap / (importance.sum(1) + _EPS)).mean()


def disorder_rate(importance: Tensor, k: int) -> Tensor:
    return (importance[:, k:].max(1).values > importance[:, :k].min(1).values).float().mean()


def objective(logits: Tensor, y: Tensor, importance: Tensor, k: int, rho: float, lam: float) -> tuple[Tensor, dict[str, Tensor]]:
    """lambda * CE + (1 - lambda) * (skewness loss + disorder loss), and its parts."""
    ce = F.cross_entropy(logits, y)
    skew, dis = skewness_loss(importance, k, rho), disorder_loss(importance, k)
    return lam * ce + (1 - lam) * (skew + dis), {"ce": ce, "skew_loss": skew, "disorder_loss": dis}
