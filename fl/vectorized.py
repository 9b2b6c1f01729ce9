"""Vectorized clients: K clients' FedAvg ClientUpdate (``fl.local_training.train_dense``) as one
computation.

Every client starts from the same received weights, runs the same architecture and, when they hold
the same number of samples, the same step schedule (E epochs of the same batch sizes). Their
weights and SGD momentum buffers are stacked along a leading client axis and each step is one
``torch.func.vmap`` of ``torch.func.grad_and_value`` of ``torch.func.functional_call``: K forward
and backward passes as one batched one. The SGD update is PyTorch's own single-tensor SGD
(``torch.optim.sgd._single_tensor_sgd``: weight decay added to the gradient, momentum buffer
cloned on the first step, then ``buf * momentum + grad``, ``p - lr * buf``) written on the stacked
tensors, so a client's weights equal the sequential trainer's up to the float reassociation of the
batched kernels (``tests/test_vectorized.py``: max abs difference about 1e-7 of the weight scale).

What is the same as the sequential trainer, and how:

- minibatches: each client's are ``ClientData.batches``' (the sequential trainer's): its own
  ``torch.Generator`` draws one ``randperm`` per epoch, a last batch smaller than
  ``smallest_batch`` joins the one before it; on an accelerator the K clients' resident samples
  (``fl.resident_data``) are stacked once per call, so a step is one gather on the device;
- metrics: summed on the device (``fl.local_training.RunningMetrics``), read once per call;
- unequal sample counts: clients are grouped by their step schedule (the list of batch sizes);
  each group is one vmap, a group of one is still exact;
- BatchNorm: the stacked running statistics are passed to ``functional_call`` as per-client
  buffers, so ``ema`` updates each client's copy in place as PyTorch's layer does; ``global``
  (statistics of the received weights on the client's data) and ``local`` (of the trained weights)
  are the same no-grad passes as ``fl.local_training.statistics_before/after``, one client at a time;
- randomness inside the model (Dropout draws from the global stream, in the sequential order of
  the clients) cannot be reproduced per client in one vmap: such a model is refused
  (``unsupported_reason``);
- a sparse model (FedDST-like's ``clients.feddst_trainer.train_masked``, outside readjustment
  rounds): with ``masks``, each masked weight starts on its mask, its gradient is multiplied by the
  mask before each SGD step and the weight after it, as the sequential masked trainer does.

Hand-written because no well-kept library trains independent FL clients as one vmap; torch.func is
the real component.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from fl.batchnorm import smallest_batch
from fl.compute import model_device
from fl.local_training import (ClientData, RunningMetrics, TrainHyper, batch_bounds, statistics_after,
                               statistics_before)
from fl.resident_data import client_samples

State = dict[str, Tensor]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot train vectorized with results equal to the sequential trainer's, or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return (f"layer {name!r} ({type(module).__name__}) draws random numbers that vectorized clients "
                    "cannot reproduce per client")
    return None


def schedule(n: int, hyper: TrainHyper, min_size: int) -> tuple[int, ...]:
    """The batch sizes of one epoch of ``n`` samples (equal for every epoch)."""
    return tuple(end - start for start, end in batch_bounds(n, hyper.batch_size, min_size))


def groups(datas: Sequence[ClientData], hyper: TrainHyper, min_size: int) -> list[list[int]]:
    """Indices of ``datas`` grouped by equal step schedule, in first-appearance order."""
    by_schedule: dict[tuple[int, ...], list[int]] = {}
    for k, data in enumerate(datas):
        by_schedule.setdefault(schedule(len(data), hyper, min_size), []).append(k)
    return list(by_schedule.values())


def train_dense_vectorized(model: nn.Module, received: State, datas: Sequence[ClientData], hyper: TrainHyper,
                           generators: Sequence[torch.Generator], masks: State | None = None,
                           ) -> tuple[list[State], list[dict[str, float]]]:
    """Train each client of ``datas`` (with its generator) from ``received`` as ``train_dense``
    would (with ``masks``, parameter name -> bool mask, as ``train_masked`` would without its dense
    gradient); returns their state dicts (in ``model.state_dict()``'s key order, on the model's
    device) and metrics. ``model`` is a scratch instance of the architecture on the device the
    clients train on (``fl.compute``): its weights are overwritten."""
    if len(datas) != len(generators):
        raise ValueError(f"{len(datas)} clients but {len(generators)} generators")
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(reason)
    min_size = smallest_batch(model)
    states: list[State | None] = [None] * len(datas)
    metrics: list[dict[str, float] | None] = [None] * len(datas)
    for members in groups(datas, hyper, min_size):
        trained, measured = _train_group(model, received, [datas[k] for k in members], hyper,
                                         [generators[k] for k in members], min_size, masks)
        for k, state, m in zip(members, trained, measured):
            states[k], metrics[k] = state, m
    return states, metrics  # type: ignore[return-value]


def _train_group(model: nn.Module, received: State, datas: Sequence[ClientData], hyper: TrainHyper,
                 generators: Sequence[torch.Generator], min_size: int,
                 masks: State | None) -> tuple[list[State], list[dict[str, float]]]:
    k = len(datas)
    befores = []  # bn_stats=global: the received weights' statistics on each client's data
    for data in datas:
        model.load_state_dict(received)
        befores.append(statistics_before(model, data, hyper))
    model.load_state_dict(received)
    model.train()
    device = model_device(model)
    keys = list(model.state_dict().keys())
    stacked = {name: received[name].detach().to(device).unsqueeze(0).repeat(k, *[1] * received[name].dim())
               for name in keys}

    def loss_of(state: State, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = functional_call(model, state, (x,))
        return F.cross_entropy(logits, y), logits

    metrics = sgd_steps(stacked, [name for name, _ in model.named_parameters()], datas, hyper, generators, min_size,
                        loss_of, masks)
    buffers = {name for name, _ in model.named_buffers()}
    states = []
    for i, data in enumerate(datas):
        state = {name: stacked[name][i].clone() for name in keys}
        if hyper.bn_stats != "ema" and any(name in buffers for name in keys):
            model.load_state_dict(state)
            statistics_after(model, data, hyper, befores[i])
            state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        states.append(state)
    return states, metrics


def sgd_steps(stacked: State, trainable: Sequence[str], datas: Sequence[ClientData], hyper: TrainHyper,
              generators: Sequence[torch.Generator], min_size: int,
              loss_of: Callable[[State, Tensor, Tensor], tuple[Tensor, Tensor]],
              masks: State | None = None) -> list[dict[str, float]]:
    """E epochs of minibatch SGD for K clients with the same step schedule, in place on ``stacked``
    (every state tensor with a leading client axis of K): each step is one vmap of
    ``grad_and_value(loss_of)`` over the clients, differentiating the ``trainable`` entries only (the
    others, frozen weights and buffers, are read and, for BatchNorm in training mode, updated in
    place per client). ``loss_of(state, x, y)`` returns one client's (loss, logits) for one batch.
    ``masks`` (trainable name -> bool mask of one client's shape, shared by the K clients) hold
    those weights at 0 off their mask. Returns each client's mean training loss and accuracy."""
    k = len(datas)
    params = {name: stacked[name] for name in trainable}
    rest = {name: t for name, t in stacked.items() if name not in params}
    held = {name: mask.to(params[name].device, params[name].dtype) for name, mask in (masks or {}).items()}
    with torch.no_grad():
        for name, mask in held.items():
            params[name].mul_(mask)

    def objective(p: State, r: State, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return loss_of({**p, **r}, x, y)

    step = vmap(grad_and_value(objective, has_aux=True), in_dims=(0, 0, 0, 0))
    device = next(iter(stacked.values())).device
    momentum: State | None = None
    running = RunningMetrics(k)
    samples = stacked_samples(datas, device)
    for _ in range(hyper.epochs):
        for x, y in side_by_side(datas, generators, hyper.batch_size, min_size, device, samples):
            grads, (loss, logits) = step(params, rest, x, y)
            for name, mask in held.items():
                grads[name].mul_(mask)
            momentum = _sgd(params, grads, momentum, hyper)
            with torch.no_grad():
                for name, mask in held.items():
                    params[name].mul_(mask)
            running.add(loss, logits, y)
    return running.means()


def stacked_samples(datas: Sequence[ClientData], device: torch.device) -> tuple[Tensor, Tensor] | None:
    """On an accelerator, the K clients' samples stacked ``(K, n, ...)`` on it once per call (from
    their resident copies, ``fl.resident_data``), so that each step's K minibatches are one gather;
    None on the CPU, where each batch is gathered when it is needed (no host memory held)."""
    if device.type == "cpu":
        return None
    pairs = [client_samples(data.images, data.indices, device) for data in datas]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def side_by_side(datas: Sequence[ClientData], generators: Sequence[torch.Generator], batch_size: int,
                 min_size: int, device: torch.device,
                 samples: tuple[Tensor, Tensor] | None) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of the K clients' minibatches, stacked ``(K, B, ...)`` on ``device``: each client's
    are ``ClientData.batches``' (one ``randperm`` of its generator per epoch, the same bounds). From
    ``stacked_samples`` (not None) each step is one gather; else each client's batch is gathered."""
    if samples is None:
        for batches in zip(*(data.batches(batch_size, g, min_size, device=device)
                             for data, g in zip(datas, generators))):
            yield torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])
        return
    x_all, y_all = samples
    n = x_all.shape[1]
    order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(x_all.device)
    rows = torch.arange(len(datas), device=x_all.device).unsqueeze(1)
    for start, end in batch_bounds(n, batch_size, min_size):
        pick = order[:, start:end]
        yield x_all[rows, pick], y_all[rows, pick]


@torch.no_grad()
def _sgd(params: State, grads: State, momentum: State | None, hyper: TrainHyper) -> State | None:
    """One step of PyTorch's single-tensor SGD (no Nesterov, no dampening) on stacked tensors."""
    new_momentum: State = {}
    for name, p in params.items():
        g = grads[name]
        if hyper.weight_decay != 0:
            g = g.add(p, alpha=hyper.weight_decay)
        if hyper.momentum != 0:
            if momentum is None:
                buf = torch.clone(g).detach()
            else:
                buf = momentum[name].mul_(hyper.momentum).add_(g)
            new_momentum[name] = buf
            g = buf
        p.add_(g, alpha=-hyper.lr)
    return new_momentum if hyper.momentum != 0 else None
