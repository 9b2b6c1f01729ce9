"""Which BatchNorm statistics a client uploads with its weights (``train.bn_stats``).

    ema        PyTorch's default: the running statistics local SGD leaves, an exponential moving
               average (momentum 0.1) over the round's batches that starts from the global
               model's. With a few batches per round they are mostly the statistics of earlier
               weights: after two rounds of AgileNN pretraining on MNIST (100 clients of 80
               images, 10 local batches each), the averaged running variances were 3 to 69 times
               the layers' actual variances on the test images and the global model predicted one
               class in eval mode while clients trained at 50 to 70% (measured).
    recompute  after local training, every BatchNorm that trained is reset and its statistics
               recomputed for the final weights in one no-grad pass over the client's training
               data (cumulative average, ``momentum=None``). FedAvg then averages statistics of
               exactly the weights it averages: the mean of the clients' means and of their
               within-client variances. This is static BatchNorm (Diao et al., "HeteroFL",
               ICLR 2021, section 3), computed by each client on its own data, so no data leaves it.

Hand-written: torch.optim.swa_utils.update_bn does the same pass but resets every BatchNorm of the
model; here a layer is reset only when the trainer's forward path reaches it in training mode, so
a frozen BatchNorm (AgileNN's reference network once pretrained) and a layer the phase does not
run (AgileNN's remote head while the extractor is pretrained) keep their statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from clients.dense import ClientData, TrainHyper

BN_STATS = ("ema", "recompute")


def smallest_batch(model: nn.Module) -> int:
    """The smallest minibatch a model trains on: 2 with BatchNorm (its batch statistics need more
    than one sample), else 1. A client of 81 images in batches of 16 otherwise ends each epoch on
    one image: in AgileNN on MNIST that step's gradient on the first conv was 122 against 1.7-3.1
    for batches of 16, and the kernel's norm grew from 0.65 to 6.5 within the round (measured)."""
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1


def settle_batchnorm(model: nn.Module, data: ClientData, hyper: TrainHyper,
                     forward: Callable[[Tensor], Tensor] | None = None) -> None:
    """What ``hyper.bn_stats`` asks for once local training is done (the model still in training mode)."""
    if hyper.bn_stats == "recompute":
        recompute_batchnorm(model, data.batches(hyper.batch_size, None, smallest_batch(model)), forward)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                        forward: Callable[[Tensor], Tensor] | None = None) -> int:
    """Recompute, over ``batches`` through ``forward`` (default: ``model``), the statistics of
    every BatchNorm layer that the pass reaches in training mode; returns how many it reached."""
    reached: list[nn.modules.batchnorm._BatchNorm] = []
    momenta: list[float | None] = []

    def reset_on_first_call(module: nn.Module, _inputs) -> None:
        if module.training and module.track_running_stats and all(module is not m for m in reached):
            reached.append(module)
            momenta.append(module.momentum)
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the pass

    hooks = [m.register_forward_pre_hook(reset_on_first_call)
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not hooks:  # no BatchNorm: nothing to recompute, no pass
        return 0
    try:
        for x, _ in batches:
            (forward or model)(x)
    finally:
        for hook in hooks:
            hook.remove()
        for m, momentum in zip(reached, momenta):
            m.momentum = momentum
    return len(reached)
