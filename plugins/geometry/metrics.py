"""Per-sample geometry of the last layer (Li et al., "Understanding Robustness Lottery", the
geometric view of a linear classifier on learned features).

For a sample with feature vector x (the input of the final ``nn.Linear``), true class y, class
weight rows W_c and biases b_c:

    length   ||x||_2
    angle    angle(x, W_y) in degrees; ``angles[:, c]`` = angle(x, W_c) for every class c
    margin   min_{j != y} ((W_y - W_j) x + b_y - b_j) / ||W_y - W_j||
             the signed distance from x to the nearest decision boundary of class y, bias
             included: positive iff the sample is classified correctly (zero on a tie)

Everything is computed batch by batch from the classifier's own input and output (captured by a
forward hook), so the numerators are the logits the model really produced and the sign of the
margin agrees with ``argmax`` exactly. Memory is O(N * C) for N samples and C classes (the
pairwise class distances are C x C, computed once per model). A zero feature vector has no
direction: its angles are NaN, never an error.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from fl.compute import model_device


@dataclass
class Geometry:
    """Per-sample values for N samples (tensors on the CPU)."""

    length: Tensor  # [N]
    angle: Tensor  # [N] degrees to the true class direction W_y (NaN for x = 0)
    angles: Tensor  # [N, C] degrees to every class direction
    margin: Tensor  # [N] signed distance to the nearest boundary of the true class
    labels: Tensor  # [N] int64
    predicted: Tensor  # [N] int64

    @property
    def correct(self) -> Tensor:
        return self.predicted == self.labels

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def cat(parts: list["Geometry"]) -> "Geometry":
        return Geometry(*(torch.cat([getattr(p, f) for p in parts]) for f in
                          ("length", "angle", "angles", "margin", "labels", "predicted")))


def sample_geometry(features: Tensor, logits: Tensor, weight: Tensor, labels: Tensor) -> Geometry:
    """Geometry of one batch: features [N, D] entering a linear layer with ``weight`` [C, D]
    that produced ``logits`` [N, C] (bias included) for samples of class ``labels`` [N]."""
    features, logits, weight = features.detach().double(), logits.detach().double(), weight.detach().double()
    labels = labels.long()
    n, classes = logits.shape
    length = features.norm(dim=1)
    # cos(x, W_c) = x . W_c / (||x|| ||W_c||); 0 / 0 = NaN for a zero feature vector.
    cos = (features @ weight.T) / (length[:, None] * weight.norm(dim=1)[None, :])
    angles = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
    rows = torch.arange(n)
    distance = torch.cdist(weight, weight)[labels]  # ||W_y - W_j||, [N, C]
    margins = (logits[rows, labels][:, None] - logits) / distance
    margins[rows, labels] = math.inf  # j != y
    margin = margins.min(dim=1).values if classes > 1 else torch.full((n,), math.inf, dtype=torch.float64)
    return Geometry(length=length.float(), angle=angles[rows, labels].float(), angles=angles.float(),
                    margin=margin.float(), labels=labels, predicted=logits.argmax(dim=1))


@contextlib.contextmanager
def capture_linear_io(model: nn.Module, layer: str = "classifier") -> Iterator[dict[str, Tensor]]:
    """Forward hook on ``model.<layer>`` (an ``nn.Linear``): yields a dict holding the last
    batch's input ``"x"`` and output ``"z"``."""
    module = model.get_submodule(layer)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"geometry needs an nn.Linear at model.{layer}, found {type(module).__name__}")
    captured: dict[str, Tensor] = {}

    def hook(_module, inputs, output):
        captured["x"], captured["z"] = inputs[0].detach(), output.detach()

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def measure(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], layer: str = "classifier") -> Geometry:
    """Run ``model`` (in eval mode, on its device) over ``(images, labels)`` batches and gather every
    sample's geometry (computed on the CPU)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    weight = model.get_submodule(layer).weight.cpu()
    parts = []
    try:
        with capture_linear_io(model, layer) as io:
            for x, y in batches:
                model(x.to(device))
                parts.append(sample_geometry(io["x"].flatten(1).cpu(), io["z"].cpu(), weight, y.cpu()))
    finally:
        model.train(was_training)
    return Geometry.cat(parts)


# -- summaries ---------------------------------------------------------------------------------

METRICS = ("length", "angle", "margin")


def summarize(geo: Geometry, num_classes: int, per_class: bool = True) -> dict[str, float]:
    """Mean and spread (std) of length, angle and margin: over all samples, over the correctly
    and the wrongly classified ones, and per true class (``class<c>/...``); plus accuracy and
    the mean angle to the other classes' directions."""
    out: dict[str, float] = {"accuracy": float(geo.correct.float().mean()) if len(geo) else math.nan}
    groups = {"": torch.ones_like(geo.labels, dtype=torch.bool), "correct/": geo.correct, "wrong/": ~geo.correct}
    if per_class:
        groups.update({f"class{c}/": geo.labels == c for c in range(num_classes)})
    for prefix, mask in groups.items():
        for metric in METRICS:
            values = getattr(geo, metric)[mask].numpy()
            mean, std = _nan_stats(values)
            out[f"{prefix}{metric}_mean"], out[f"{prefix}{metric}_std"] = mean, std
        if not prefix.startswith("class"):
            out[f"{prefix}count"] = float(mask.sum())
    other = geo.angles.clone()
    other[torch.arange(len(geo)), geo.labels] = math.nan
    out["angle_other_mean"] = _nan_stats(other.numpy())[0]
    return out


def shift(before: Geometry, after: Geometry, num_classes: int, per_class: bool = True) -> dict[str, float]:
    """How a second model (a client's) sees the same samples differently from the first (the global):
    mean change of length, angle and margin, and the samples that flip right -> wrong and back."""
    if not torch.equal(before.labels, after.labels):
        raise ValueError("shift compares two measurements of the same samples")
    out = {"right_to_wrong": float((before.correct & ~after.correct).sum()),
           "wrong_to_right": float((~before.correct & after.correct).sum()),
           "accuracy_change": float(after.correct.float().mean() - before.correct.float().mean())}
    groups = {"": torch.ones_like(before.labels, dtype=torch.bool)}
    if per_class:
        groups.update({f"class{c}/": before.labels == c for c in range(num_classes)})
    for prefix, mask in groups.items():
        for metric in METRICS:
            delta = (getattr(after, metric) - getattr(before, metric))[mask].numpy()
            out[f"{prefix}delta_{metric}"] = _nan_stats(delta)[0]
    return out


def finite(values: Tensor) -> np.ndarray:
    """The finite entries, for a histogram (NaN angles and infinite margins have no bin)."""
    array = values.reshape(-1).numpy()
    return array[np.isfinite(array)]


def _nan_stats(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std())
