"""Dense local training: FedAvg's ClientUpdate (McMahan et al., AISTATS 2017, Algorithm 1).

``E`` epochs of minibatch SGD of size ``B`` over the client's own samples, starting from the
received global weights. A plain function of (model, data, hyper-parameters, generator): it
knows nothing of Flower, Ray or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fl.batchnorm import BUFFERS, recompute_batchnorm, smallest_batch
from fl.compute import model_device
from fl.resident_data import device_batches


@dataclass(frozen=True)
class TrainHyper:
    """Local SGD settings. The defaults are the CLI's (``train:`` in ``sim_configs/config.yaml``,
    checked equal by ``tests/test_interop.py``): a client takes them for every key a train message
    omits (``clients.trainer.hyper_from``), e.g. under a stock Flower ServerApp."""

    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    bn_stats: str = "global"  # BatchNorm statistics uploaded: global | local | ema (fl.batchnorm)


@dataclass
class ClientData:
    """One client's samples: an ImageSet and the indices this client holds."""

    images: object  # fl.data ImageSet
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, generator: torch.Generator | None, min_size: int = 1, *,
                device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Minibatches in ``generator``'s order (None: stored order), on ``device`` (None: where
        the images are, the CPU); a last batch smaller than ``min_size`` joins the one before it.
        On an accelerator the client's samples stay resident there between rounds
        (``fl.resident_data``); on the CPU each batch is gathered when it is needed."""
        permutation = None if generator is None else torch.randperm(len(self.indices), generator=generator)
        bounds = batch_bounds(len(self.indices), batch_size, min_size)
        if device is not None and device.type != "cpu":
            yield from device_batches(self.images, self.indices, bounds, permutation, device)
            return
        order = self.indices if permutation is None else self.indices[permutation.numpy()]
        for start, end in bounds:
            x, y = self.images.get(order[start:end])
            yield (x, y) if device is None else (x.to(device), y.to(device))


def batch_bounds(n: int, batch_size: int, min_size: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each minibatch of n samples; a last batch smaller than ``min_size`` joins
    the one before it."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_size:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))


def statistics_before(model: nn.Module, data: ClientData, hyper: TrainHyper,
                      forward: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor] | None:
    """Before local training (``global``): the received weights' statistics, recomputed in place
    and returned by state-dict name, for ``statistics_after`` to put back."""
    if hyper.bn_stats != "global":
        return None
    reached = _recompute_on(model, data, hyper, forward)
    names = {id(m): name for name, m in model.named_modules()}
    return {f"{names[id(m)]}.{b}": getattr(m, b).detach().clone() for m in reached for b in BUFFERS}


def statistics_after(model: nn.Module, data: ClientData, hyper: TrainHyper, before: dict[str, Tensor] | None,
                     forward: Callable[[Tensor], Tensor] | None = None) -> None:
    """After local training: leave in ``model`` the statistics ``hyper.bn_stats`` names."""
    if hyper.bn_stats == "global" and before:
        model.load_state_dict(before, strict=False)
    elif hyper.bn_stats == "local":
        _recompute_on(model, data, hyper, forward)


def _recompute_on(model: nn.Module, data: ClientData, hyper: TrainHyper,
                  forward: Callable[[Tensor], Tensor] | None) -> list[nn.Module]:
    model.train()
    return recompute_batchnorm(model, data.batches(hyper.batch_size, None, smallest_batch(model),
                                                   device=model_device(model)), forward)


class RunningMetrics:
    """Sample-weighted loss and accuracy over a client's minibatches (or K clients' at once, every
    tensor with a leading client axis), summed on the device the batches are on: on a GPU, no
    host round trip per batch, one when the means are read. The sums are float64 and int64 in
    batch order, so the means equal a host loop of ``loss.item() * len(y)`` and
    ``int(hits)`` bit for bit."""

    def __init__(self, clients: int = 1):
        self.clients = clients
        self.loss_sum: Tensor | None = None
        self.correct: Tensor | None = None
        self.seen = 0

    @torch.no_grad()
    def add(self, loss: Tensor, logits: Tensor, y: Tensor, *, mean: bool = True) -> None:
        """One batch: ``loss`` is its mean (``mean=True``) or its sum; ``y`` its labels."""
        n = y.shape[-1]
        loss_total = loss.detach().to(torch.float64) * (n if mean else 1)
        hits = (logits.argmax(-1) == y).sum(-1)
        self.loss_sum = loss_total if self.loss_sum is None else self.loss_sum + loss_total
        self.correct = hits if self.correct is None else self.correct + hits
        self.seen += n

    def means(self, loss_key: str = "train_loss", accuracy_key: str = "train_accuracy") -> list[dict[str, float]]:
        """Each client's mean loss and accuracy (zeros before any batch)."""
        seen = max(self.seen, 1)
        if self.loss_sum is None or self.correct is None:
            return [{loss_key: 0.0, accuracy_key: 0.0} for _ in range(self.clients)]
        losses = self.loss_sum.reshape(-1).tolist()
        hits = self.correct.reshape(-1).tolist()
        return [{loss_key: loss / seen, accuracy_key: int(hit) / seen} for loss, hit in zip(losses, hits)]


def local_sgd(model: nn.Module, hyper: TrainHyper) -> torch.optim.SGD:
    """The client's optimizer: plain SGD with the message's learning rate, momentum and weight
    decay, new every round (momentum does not carry over between rounds)."""
    return torch.optim.SGD(model.parameters(), lr=hyper.lr, momentum=hyper.momentum, weight_decay=hyper.weight_decay)


def train_dense(model: nn.Module, data: ClientData, hyper: TrainHyper, generator: torch.Generator) -> dict[str, float]:
    """Local SGD in place on ``model``, on the device it is on; returns the mean training loss and accuracy."""
    before = statistics_before(model, data, hyper)
    model.train()
    optimizer = local_sgd(model, hyper)
    device = model_device(model)
    running = RunningMetrics()
    for _ in range(hyper.epochs):
        for x, y in data.batches(hyper.batch_size, generator, smallest_batch(model), device=device):
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            running.add(loss, logits, y)
    statistics_after(model, data, hyper, before)
    return running.means()[0]


@torch.no_grad()
def evaluate(model: nn.Module, data: ClientData, batch_size: int = 512) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``data``, on the device the model is on."""
    model.eval()
    running = RunningMetrics()
    for x, y in data.batches(batch_size, None, device=model_device(model)):
        logits = model(x)
        running.add(F.cross_entropy(logits, y, reduction="sum"), logits, y, mean=False)
    return running.means("loss", "accuracy")[0]
