"""Feature importance by integrated gradients (Huang and Gao, MobiCom 2022, section 4.1; IG:
Sundararajan et al., ICML 2017), differentiable, for the skewness and disorder losses.

For the extracted features f of a sample with label y and the frozen reference network R, the
loss ``l(f) = CE(R(f), y)`` and a zero baseline, 2-point IG with the trapezoid rule is

    IG(f) = f * (grad l(0) + grad l(f)) / 2                              (trapezoid, points 0, 1)

Captum's ``IntegratedGradients(method="riemann_trapezoid", n_steps=n)`` evaluates the same
points (alphas ``linspace(0, 1, n)``) but with step sizes 1/n, halved at both ends, which sum to
(n - 1)/n instead of 1: for n = 2 it returns ``f * (g(0) + g(f)) / 4``, half the trapezoid rule.
``captum_ig`` multiplies by n / (n - 1) to undo that scaling (a test checks both). Training needs d IG / d f
(double backprop: ``create_graph=True``), which captum does not give, so it is computed here with
autograd; captum is used for monitoring (``captum_ig``) and a test checks the two agree.

``grad l(0)`` does not depend on the sample, only on its label, when R is frozen (BatchNorm in
eval mode): ``ZeroBaselineCache`` computes it once for every class in one batched backward and
indexes it by label.

The importance of channel c is ``I_c = sum_{h,w} |IG_{c,h,w}|`` (documented choice: the paper
ranks channels by their attributions; summing absolute attributions over a channel's map is
captum's usual reduction for a channel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl.compute import model_device


def per_sample_loss(reference: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """The true-label cross-entropy of every sample, [B]."""
    return F.cross_entropy(reference(f), y, reduction="none")


class ZeroBaselineCache:
    """grad_f CE(R(f), c) at f = 0 for every class c, recomputed when the reference's weights change."""

    def __init__(self):
        self._key: tuple | None = None
        self._grads: Tensor | None = None

    def _fingerprint(self, reference: nn.Module) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in reference.state_dict().values())

    def get(self, reference: nn.Module, shape: tuple[int, ...], num_classes: int,
            dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or next(reference.parameters()).dtype
        device = model_device(reference)
        key = (self._fingerprint(reference), tuple(shape), num_classes, dtype, device)
        if key != self._key:
            zero = torch.zeros((num_classes, *shape), dtype=dtype, device=device, requires_grad=True)
            with torch.enable_grad():
                loss = per_sample_loss(reference, zero, torch.arange(num_classes, device=device)).sum()
                (grad,) = torch.autograd.grad(loss, zero)
            self._key, self._grads = key, grad.detach()
        return self._grads


def integrated_gradients(reference: nn.Module, f: Tensor, y: Tensor, cache: ZeroBaselineCache,
                         num_classes: int, create_graph: bool = True) -> Tensor:
    """2-point IG of the true-label loss with a zero baseline, differentiable in ``f``."""
    if not f.requires_grad:
        f = f.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = per_sample_loss(reference, f, y).sum()  # per-sample gradients: samples are independent
        (grad_f,) = torch.autograd.grad(loss, f, create_graph=create_graph)
    grad_0 = cache.get(reference, tuple(f.shape[1:]), num_classes, f.dtype)[y]
    return f * (grad_0 + grad_f) / 2


def channel_importance(ig: Tensor) -> Tensor:
    """I_c = sum over the channel's map of |IG|, [B, C]."""
    return ig.abs().sum(dim=tuple(range(2, ig.dim())))


def captum_ig(reference: nn.Module, f: Tensor, y: Tensor, n_steps: int = 2, rescale: bool = True) -> Tensor:
    """captum's IntegratedGradients of the true-label loss, zero baseline, trapezoid rule;
    ``rescale``: times n / (n - 1), captum's trapezoid weights summing to (n - 1) / n."""
    from captum.attr import IntegratedGradients

    def forward(features: Tensor, labels: Tensor) -> Tensor:
        return per_sample_loss(reference, features, labels)

    ig = IntegratedGradients(forward)
    out = ig.attribute(f.detach(), baselines=torch.zeros_like(f), additional_forward_args=(y,),
                       n_steps=n_steps, method="riemann_trapezoid")
    return out * (n_steps / (n_steps - 1)) if rescale else out
