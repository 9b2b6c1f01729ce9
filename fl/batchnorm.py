"""Which BatchNorm statistics a client uploads with its weights (``train.bn_stats``).

FedAvg averages weights and BatchNorm statistics alike, but averaged weights do not produce the
averaged statistics. Three choices, each measured on AgileNN's split network (BatchNorm
throughout; measured in docs/plugin-agilenn.md):

    ema      PyTorch's default: the running statistics local SGD leaves, an exponential moving
             average (momentum 0.1) over the round's batches, started from the global model's.
             With a few batches per round they are mostly statistics of earlier weights: in
             AgileNN on MNIST (100 clients of 80 images) the global model predicted one class
             in eval mode through round 9, and at round 10 the averaged running variances were
             a median 1.3 to 14.8 times the layers' actual variances (up to 52 times).
    local    after local training, every BatchNorm that trained is reset and recomputed for the
             client's final weights in one no-grad pass over its data (static BatchNorm, Diao et
             al., "HeteroFL", ICLR 2021, section 3, computed by each client on its own data).
    global   (default) the same pass, but before local training, for the weights the client
             received; those statistics are uploaded with the trained weights. The average is
             then the received global model's statistics over the sampled clients' data, one
             round old. Emulating one round from the same global model (the clients' updates
             averaged, accuracy of the result in eval mode): MNIST round 5, 16 clients: local
             0.73, global 0.80; synthetic round 20, 40 clients: ema 0.096, local 0.097,
             global 0.151; MNIST round 10: ema 0.936, local 0.928, global 0.939. Statistics
             recomputed for the averaged weights on the same data (an extra exchange of the
             whole model, which the simulator does not make) gave 0.91, 0.18 and 0.942.

Hand-written: torch.optim.swa_utils.update_bn does the same pass but resets every BatchNorm of the
model; here a layer is reset only when the trainer's forward path reaches it in training mode, so
a frozen BatchNorm (AgileNN's reference network once pretrained) and a layer the phase does not
run (AgileNN's remote head while the extractor is pretrained) keep their statistics.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn


BN_STATS = ("global", "local", "ema")
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def smallest_batch(model: nn.Module) -> int:
    """The smallest minibatch a model trains on: 2 with BatchNorm (its batch statistics need more
    than one sample), else 1. A client of 81 images in batches of 16 otherwise ends each epoch on
    one image: in AgileNN on MNIST that step's gradient on the first conv was 122 against 1.7-3.1
    for batches of 16, and the kernel's norm grew from 0.65 to 6.5 within the round (measured)."""
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                        forward: Callable[[Tensor], Tensor] | None = None) -> list[nn.Module]:
    """Recompute, over ``batches`` through ``forward`` (default: ``model``), the statistics of
    every BatchNorm layer that the pass reaches in training mode; returns those layers."""
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
        return []
    try:
        for x, _ in batches:
            (forward or model)(x)
    finally:
        for hook in hooks:
            hook.remove()
        for m, momentum in zip(reached, momenta):
            m.momentum = momentum
    return reached
