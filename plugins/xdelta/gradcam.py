"""GradCAM++ activation maps on captum's layer gradients (XDELTA, Wang and Nirjon, Section 4.1).

XDELTA explains a DELTA by where it looks: GradCAM++ (Chattopadhyay et al., WACV 2018, eq. 19)
on the DELTA's last feature layer for the class the fused edge+DELTA model predicts, and on the
edge model's last conv layer for the edge's own prediction. captum ships GradCAM but not
GradCAM++; captum's ``compute_layer_gradients_and_eval`` gives the layer's activations A and the
gradients g = dY_c / dA, and the rest is the formula (with the exponential trick of the GradCAM++
paper, the second and third derivatives are powers of the first):

    alpha_k,ij = g_k,ij^2 / (2 g_k,ij^2 + sum_ab A_k,ab * g_k,ij^3)     (0 where g = 0 or the
                                                                         denominator is 0)
    w_k        = sum_ij alpha_k,ij * relu(g_k,ij)
    map        = relu(sum_k w_k A_k), bilinearly upsampled to the input size.

Which layers (a documented choice; the paper names "the last feature layer"):
    DELTA  the output of its SE block (``delta.se``): the last spatial map before pooling; or,
           with ``delta_map_size`` N > 0 and an SE map smaller than N x N, the rectified output
           of the DELTA's last conv whose map is at least N x N (``delta_layer``). The paper's
           images are 224 pixels; on 32x32 images the shipped DELTA (cut from a VGG11 with four
           pools) ends in a 2x2 map, one cell of which is a quarter of the image, so a region
           there cannot say where the DELTA looked;
    edge   the rectified output of its last conv (the activation module right after the last
           ``nn.Conv2d`` in ``edge.features``), which is where GradCAM reads a VGG-style CNN;
    base   the same rule as the edge (used for locality when a dataset has no object masks).
Models are explained through a deep copy whose ReLUs are not in place, so the hooked activation
is never overwritten by the next layer.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from captum._utils.gradient import compute_layer_gradients_and_eval
from torch import Tensor, nn

from fl.compute import model_device


def gradcam_pp_weights(grads: Tensor, acts: Tensor) -> Tensor:
    """Per-channel weights w_k [B, K] from gradients and activations [B, K, h, w] (eq. 19)."""
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
    return (alpha * F.relu(grads)).sum(dim=(2, 3))


def gradcam_pp_map(grads: Tensor, acts: Tensor) -> Tensor:
    """relu(sum_k w_k A_k): the map [B, h, w] at the layer's resolution."""
    weights = gradcam_pp_weights(grads, acts)
    return F.relu((weights[:, :, None, None] * acts).sum(dim=1))


class GradCAMPlusPlus:
    """captum-style: the constructor fixes what is explained, ``attribute`` how (one map per input)."""

    def __init__(self, forward_func: Callable[[Tensor], Tensor], layer: nn.Module):
        self.forward_func, self.layer = forward_func, layer

    def attribute(self, inputs: Tensor, target: Tensor | int, *, upsample: bool = True) -> Tensor:
        """Maps [B, H, W] (input size when ``upsample``, else the layer's), finite and >= 0."""
        grads, acts = compute_layer_gradients_and_eval(self.forward_func, self.layer, inputs, target_ind=target)
        cam = gradcam_pp_map(grads[0].detach(), acts[0].detach())
        cam = torch.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0)
        if upsample and cam.shape[-2:] != inputs.shape[-2:]:
            cam = F.interpolate(cam[:, None], size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            cam = cam.clamp_min(0.0)
        return cam


DELTA_MAP_SIZE = 8  # default of xdelta.delta_map_size (sim_configs/plugins/xdelta.yaml)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish)


def not_inplace(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every in-place ReLU made out-of-place (same function)."""
    clone = copy.deepcopy(model).eval()
    for m in clone.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return clone


def _rectified(modules: list[nn.Module], i: int) -> nn.Module:
    """The activation module after the conv ``modules[i]`` (past any normalization), or that conv."""
    for m in modules[i + 1:]:
        if isinstance(m, _ACTIVATIONS):
            return m
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            break
    return modules[i]


def conv_activations(features: nn.Module) -> list[nn.Module]:
    """The rectified output of every ``nn.Conv2d`` of ``features``, in order."""
    modules = list(features.modules())
    return [_rectified(modules, i) for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]


def last_conv_activation(features: nn.Module) -> nn.Module:
    """The activation module right after the last ``nn.Conv2d`` of ``features`` (or that conv)."""
    layers = conv_activations(features)
    if not layers:
        raise ValueError("no nn.Conv2d in the feature extractor: nothing to explain with GradCAM++")
    return layers[-1]


def delta_layer(fused: nn.Module, input_shape: tuple[int, int, int], min_map: int = 0) -> nn.Module:
    """The DELTA layer GradCAM++ reads: its SE output when ``min_map`` is 0 or that map is at least
    ``min_map`` on each side, else the rectified output of its last conv whose map is. A ValueError
    (its message without the option's name, which the caller's ConfigError adds) for a size < 0 or
    one that no layer reaches."""
    if min_map < 0:
        raise ValueError(f"must be >= 0 (0: the DELTA's last layer), got {min_map}")
    delta = fused.delta
    candidates = conv_activations(delta.features) + [delta.se]
    sizes: dict[nn.Module, int] = {}

    def record(module: nn.Module, _inputs, out: Tensor) -> None:  # returns None: the output stays as it is
        sizes[module] = min(out.shape[-2:])

    hooks = [m.register_forward_hook(record) for m in candidates]
    try:
        with torch.no_grad():
            was_training = fused.training
            fused.eval()
            fused(torch.zeros(1, *input_shape, device=model_device(fused)))
            fused.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    if min_map == 0 or sizes[delta.se] >= min_map:
        return delta.se
    fitting = [m for m in candidates[:-1] if sizes[m] >= min_map]
    if not fitting:
        raise ValueError(f"no DELTA layer has a map of at least {min_map}x{min_map} "
                         f"(largest {max(sizes.values())}x{max(sizes.values())}); choose a smaller size, or 0 for "
                         "the last feature layer")
    return fitting[-1]


class Explainers:
    """GradCAM++ for the fused model's DELTA, the edge and (optionally) the base, built once."""

    def __init__(self, fused: nn.Module, base: nn.Module | None = None, *,
                 input_shape: tuple[int, int, int] = (3, 32, 32), delta_map_size: int = DELTA_MAP_SIZE):
        self.fused = not_inplace(fused)
        self.edge = self.fused.edge
        self.base = None if base is None else not_inplace(base)
        self.delta_cam = GradCAMPlusPlus(self.fused, delta_layer(self.fused, input_shape, delta_map_size))
        self.edge_cam = GradCAMPlusPlus(self.edge, last_conv_activation(self.edge.features))
        self.base_cam = None if self.base is None else GradCAMPlusPlus(
            self.base, last_conv_activation(self.base.features))
