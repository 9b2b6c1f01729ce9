"""AgileNN's training steps and measurements (Huang and Gao, MobiCom 2022, sections 4-5).

- ``pretrain_loss``: the extractor and the reference trained together with CE (section 4.1),
  before the reference is frozen and the channels are selected (``selection``).
- ``agile_loss``: one AgileNN step's objective, lambda * CE(alpha L + (1-alpha) R, y) +
  (1 - lambda) * (skewness + disorder) with the importance from differentiable 2-point IG.
- ``plain_loss``: the same network and forward pass with CE only (the overhead baseline).
- ``train_epochs``: minibatch SGD over a client's data with any of the three, timing each step.
- ``measure``: local / remote / combined accuracy, skewness, disorder rate, alpha and coded
  bytes per offloaded sample on a set of images.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fl.batchnorm import smallest_batch
from fl.compute import model_device
from fl.payload import coded_bytes_per_sample
from plugins.agilenn.importance import ZeroBaselineCache, channel_importance, integrated_gradients
from plugins.agilenn.losses import disorder_rate, objective, skewness
from plugins.agilenn.network import AgileNet

if TYPE_CHECKING:  # clients imports this module (its agilenn trainer): no import back at run time
    from fl.local_training import ClientData, TrainHyper

Loss = Callable[[AgileNet, Tensor, Tensor], tuple[Tensor, Tensor, dict[str, float]]]


@dataclass(frozen=True)
class AgileHyper:
    rho: float = 0.8  # required skewness
    lam: float = 0.8  # weight of the CE term


def pretrain_loss(model: AgileNet, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
    logits = model.reference_logits(x)
    return F.cross_entropy(logits, y), logits, {}


def plain_loss(model: AgileNet, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
    logits = model(x)
    return F.cross_entropy(logits, y), logits, {}


class AgileLoss:
    """The AgileNN objective, holding the per-class zero-baseline gradient cache."""

    def __init__(self, hyper: AgileHyper, num_classes: int):
        self.hyper, self.num_classes = hyper, num_classes
        self.cache = ZeroBaselineCache()

    def importance(self, model: AgileNet, f: Tensor, y: Tensor, create_graph: bool = True) -> Tensor:
        ig = integrated_gradients(model.reference, f, y, self.cache, self.num_classes, create_graph)
        return channel_importance(ig)

    def __call__(self, model: AgileNet, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        f = model.extractor(x)
        importance = self.importance(model, f, y)
        local = model.local(f[:, :model.k])
        remote = model.remote(model.quantizer(f[:, model.k:]))
        logits = model.combine(local, remote)
        loss, parts = objective(logits, y, importance, model.k, self.hyper.rho, self.hyper.lam)
        with torch.no_grad():
            stats = {k: float(v) for k, v in parts.items()}
            stats["skewness"] = float(skewness(importance, model.k).mean())
            stats["disorder_rate"] = float(disorder_rate(importance, model.k))
        return loss, logits, stats


def optimizer_for(model: AgileNet, hyper: TrainHyper) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=hyper.lr, momentum=hyper.momentum, weight_decay=hyper.weight_decay)


def train_epochs(model: AgileNet, data: ClientData, hyper: TrainHyper, generator: torch.Generator,
                 loss_fn: Loss) -> dict[str, float]:
    """Local SGD in place with ``loss_fn``; sample-weighted means of the loss, accuracy and the
    step statistics, and the mean seconds per step (``step_s``)."""
    model.train()
    optimizer = optimizer_for(model, hyper)
    sums: dict[str, float] = {}
    correct, seen, steps, seconds = 0, 0, 0, 0.0
    device = model_device(model)
    for _ in range(hyper.epochs):
        for x, y in data.batches(hyper.batch_size, generator, smallest_batch(model), device=device):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, logits, stats = loss_fn(model, x, y)
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - started
            steps += 1
            for key, value in {"train_loss": float(loss.detach()), **stats}.items():
                sums[key] = sums.get(key, 0.0) + value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    out = {k: v / max(seen, 1) for k, v in sums.items()}
    out.update(train_accuracy=correct / max(seen, 1), step_s=seconds / max(steps, 1))
    return out


def time_steps(model: AgileNet, batches: list[tuple[Tensor, Tensor]], loss_fn: Loss, hyper: TrainHyper,
               repeats: int = 1) -> float:
    """Mean seconds of one SGD step with ``loss_fn`` on a copy of ``model`` (one warm-up step)."""
    probe = copy.deepcopy(model).train()
    optimizer = optimizer_for(probe, hyper)
    times = []
    for i in range(repeats + 1):
        for x, y in batches:
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(probe, x, y)[0].backward()
            optimizer.step()
            if i > 0:
                times.append(time.perf_counter() - started)
    return float(np.mean(times))


def step_overhead(model: AgileNet, batches: list[tuple[Tensor, Tensor]], agile: AgileLoss, hyper: TrainHyper,
                  repeats: int = 1) -> dict[str, float]:
    """AgileNN step time against a plain step of the same network on the same batches, measured
    back to back on copies (the model itself is not changed)."""
    plain = time_steps(model, batches, plain_loss, hyper, repeats)
    agile_s = time_steps(model, batches, agile, hyper, repeats)
    return {"plain_step_s": plain, "agile_step_s": agile_s, "step_overhead": agile_s / plain}


def measure(model: AgileNet, batches: Iterable[tuple[Tensor, Tensor]], agile: AgileLoss) -> dict[str, float]:
    """Accuracy of the local, remote and combined predictions, mean skewness, disorder rate,
    alpha and the mean coded bytes per offloaded sample (``fl.payload``) over ``batches`` (moved
    to the model's device)."""
    model.eval()
    device = model_device(model)
    sums = {"local_accuracy": 0.0, "remote_accuracy": 0.0, "combined_accuracy": 0.0, "skewness": 0.0,
            "disorder_rate": 0.0, "bytes_per_sample": 0.0, "loss": 0.0}
    n = 0
    levels = model.quantizer.levels
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            f, local, remote, combined = model.split_outputs(x)
            coded = coded_bytes_per_sample(model.quantizer.indices(f[:, model.k:]).cpu().numpy(), levels)
        importance = agile.importance(model, f, y, create_graph=False).detach()
        b = len(y)
        sums["local_accuracy"] += float((local.argmax(1) == y).sum())
        sums["remote_accuracy"] += float((remote.argmax(1) == y).sum())
        sums["combined_accuracy"] += float((combined.argmax(1) == y).sum())
        sums["skewness"] += float(skewness(importance, model.k).sum())
        sums["disorder_rate"] += float(disorder_rate(importance, model.k)) * b
        sums["bytes_per_sample"] += float(coded.sum())
        sums["loss"] += float(F.cross_entropy(combined, y, reduction="sum"))
        n += b
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["alpha"] = float(model.alpha.detach())
    out["raw_bytes_per_sample"] = float((model.channels - model.k) * int(np.prod(f.shape[2:])) * 4)
    return out


@torch.no_grad()
def reference_accuracy(model: AgileNet, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    model.eval()
    device = model_device(model)
    correct = n = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        correct += int((model.reference_logits(x).argmax(1) == y).sum())
        n += len(y)
    return correct / max(n, 1)
