"""The ``masked`` trainer: FedDST's client step (Bibikar et al., "Federated Dynamic Sparse
Training", AAAI 2022, Algorithm 1, client side; the server side is ``strategies/feddst.py``).

    receive:   the global sparse model: its values at the global mask m, plus the bitmap of m
               when this node does not hold that mask version yet (``fl.payload`` bitmap codec);
               the node keeps the last mask it received in its persistent state
    train:     E epochs of minibatch SGD under m: gradients off the mask are zeroed before each
               optimizer step (so momentum never carries them) and the weights are multiplied by
               m after it, so every off-mask weight is exactly 0 after every step
    readjust:  on readjustment rounds, after the last local epoch, for every masked tensor l with
               K_l active weights out of N_l and n_l = min(ceil(alpha_t * K_l), K_l, N_l - K_l):
                 prune  the n_l active weights of smallest |w|
                 grow   the n_l positions that were inactive before the prune with the largest
                        |g|, g the dense gradient (every coordinate, on or off the mask) averaged
                        over the minibatches of the last local epoch; grown weights start at 0
               so the mask keeps K_l entries and moves by exactly 2 n_l coordinates; ties go to
               the lower flat index
    upload:    the values at the (possibly readjusted) mask; the bitmap only after a readjustment
               (otherwise the server knows the mask: it is the one it sent)

The authors' code (github.com/bibikar/feddst, ``dst.py``) readjusts at the same point, after the
last local epoch, with the gradient of the last minibatch; this trainer averages the gradient
over the whole last epoch, at no extra cost (autograd computes the dense weight gradient anyway).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from clients.trainer import ClientEnv, Session, hyper_from, register_trainer
from fl.batchnorm import smallest_batch
from fl.compute import model_device, to_cpu
from fl.local_training import (ClientData, RunningMetrics, TrainHyper, local_sgd, statistics_after,
                               statistics_before)
from fl.message_keys import CODEC, UP_CODEC
from fl.payload import BitmapCodec, Masks, get_codec, has_bitmap, shared_decode

# Message keys of the FedDST protocol (the strategy imports them from here).
MASKED = "masked"  # this trainer's name, sent as config["trainer"]
MASK_VERSION = "mask-version"  # config: the global mask's version; reply metric: the version this node holds
READJUST_ALPHA = "readjust-alpha"  # config: alpha_t of a readjustment round, 0.0 on other rounds
MASK_HAMMING = "mask_hamming"  # reply metric: coordinates where the uploaded mask differs from the received one

# Keys in the node's persistent Context.state.
_HELD_MASK = "feddst.mask"  # ArrayRecord: name -> packed bits of the last global mask received
_HELD_META = "feddst.meta"  # ConfigRecord: {MASK_VERSION: its version}


@register_trainer(MASKED)
@contextmanager
def masked(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> Iterator[Session]:
    up = bitmap_codec_from(config, UP_CODEC)
    version = int(config[MASK_VERSION])
    alpha = float(config.get(READJUST_ALPHA, 0.0))
    with env.model() as model:
        # -- receive ------------------------------------------------------------------------
        state, masks = receive_masked(arrays, config, env, model.state_dict(), env.device)
        model.load_state_dict(state)
        uploaded = dict(masks)

        def train() -> dict[str, float]:
            # -- train under the mask -------------------------------------------------------
            metrics, gradient = train_masked(model, env.data, hyper_from(config), env.generator, masks,
                                             dense_gradient=alpha > 0)
            # -- readjust -------------------------------------------------------------------
            hamming = 0
            if alpha > 0:
                new_masks = readjust_masks(model, masks, gradient, alpha)
                hamming = sum(int((new_masks[name] ^ masks[name]).sum()) for name in masks)
                uploaded.update(new_masks)
            return {**metrics, MASK_VERSION: version, MASK_HAMMING: hamming}

        # -- upload (the readjusted mask with its bitmap on a readjustment round) -------------
        yield Session(model, train,
                      reply=lambda: up.encode_masked(to_cpu(model.state_dict()), uploaded, with_bitmap=alpha > 0))


def receive_masked(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv, reference: Mapping[str, torch.Tensor],
                   device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], Masks]:
    """The global weights (on ``device``; None: the CPU) and mask (on the CPU) of a download:
    values and bitmap, whose mask this node then holds, or values read with the mask it holds.
    Decoded once per round (``fl.payload.shared_decode``): every client of a mask version reads
    the broadcast alike. The tensors are shared: load them into a model, never modify them."""
    down = bitmap_codec_from(config, CODEC)
    version = int(config[MASK_VERSION])
    if has_bitmap(arrays):
        tag: tuple = (down.name, "bitmap")
        state, masks = shared_decode(arrays, tag, lambda: down.decode_masked(arrays, reference))
        hold_mask(env.state, masks, version)
    else:
        check_held_version(env.state, version)
        tag = (down.name, "values", version)
        state, masks = shared_decode(arrays, tag, lambda: down.decode_masked(
            arrays, reference, held_mask(env.state, reference, version)))
    return shared_decode(arrays, tag, lambda: (state, masks), device)[0], masks


# -- local training under a mask ----------------------------------------------------------------

def train_masked(model: nn.Module, data: ClientData, hyper: TrainHyper, generator: torch.Generator,
                 masks: Mapping[str, torch.Tensor], *, dense_gradient: bool = False,
                 after_step: Callable[[nn.Module], None] | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Local SGD in place with every masked parameter held at 0 off its mask.

    Returns the mean training loss and accuracy and, when ``dense_gradient``, the dense gradient
    of each masked parameter averaged over the minibatches of the last epoch. ``after_step`` is
    called with the model after every optimizer step (tests observe the invariant through it).
    """
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise ValueError(f"masks name tensors that are not parameters of the model: {missing}")
    held = [(params[name], masks[name].to(params[name].device, params[name].dtype)) for name in masks]
    with torch.no_grad():
        for weight, mask in held:
            weight.mul_(mask)
    gradient = {name: torch.zeros_like(params[name]) for name in masks} if dense_gradient else {}
    batches_in_last_epoch = 0
    before = statistics_before(model, data, hyper)
    model.train()
    optimizer = local_sgd(model, hyper)
    device = model_device(model)
    running = RunningMetrics()
    for epoch in range(hyper.epochs):
        last = epoch == hyper.epochs - 1
        for x, y in data.batches(hyper.batch_size, generator, smallest_batch(model), device=device):
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            if dense_gradient and last:
                for name in gradient:
                    if params[name].grad is not None:
                        gradient[name].add_(params[name].grad)
                batches_in_last_epoch += 1
            for weight, mask in held:
                if weight.grad is not None:
                    weight.grad.mul_(mask)
            optimizer.step()
            with torch.no_grad():
                for weight, mask in held:
                    weight.mul_(mask)
            if after_step is not None:
                after_step(model)
            running.add(loss, logits, y)
    for g in gradient.values():
        g.div_(max(batches_in_last_epoch, 1))
    statistics_after(model, data, hyper, before)
    return running.means()[0], gradient


# -- mask readjustment ------------------------------------------------------------------------

def readjust_count(alpha: float, active: int, total: int) -> int:
    """n_l = min(ceil(alpha K_l), K_l, N_l - K_l): coordinates pruned, and as many grown."""
    if alpha <= 0 or active == 0:
        return 0
    return min(math.ceil(alpha * active - 1e-9), active, total - active)


@torch.no_grad()
def readjust_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], gradient: Mapping[str, torch.Tensor],
                   alpha: float) -> Masks:
    """Prune n_l smallest-|w| active weights, grow n_l largest-|g| formerly inactive positions (at 0).
    The choice is made on the CPU, where the masks live (the weights may be on the compute device)."""
    params = dict(model.named_parameters())
    out: Masks = {}
    for name, mask in masks.items():
        weight, flat_mask = params[name].view(-1), mask.reshape(-1).to(torch.bool).cpu()
        active = flat_mask.nonzero().squeeze(1)
        inactive = (~flat_mask).nonzero().squeeze(1)
        n = readjust_count(alpha, len(active), flat_mask.numel())
        new = flat_mask.clone()
        if n > 0:
            values, grads = weight.detach().cpu(), gradient[name].reshape(-1).cpu()
            pruned = active[torch.sort(values[active].abs(), stable=True).indices[:n]]
            grown = inactive[torch.sort(grads[inactive].abs(), descending=True, stable=True).indices[:n]]
            new[pruned] = False
            new[grown] = True
            weight[pruned.to(weight.device)] = 0.0
            weight[grown.to(weight.device)] = 0.0
        out[name] = new.reshape(mask.shape)
    return out


# -- the mask this node holds (Context.state) -------------------------------------------------

def hold_mask(state: RecordDict, masks: Mapping[str, torch.Tensor], version: int) -> None:
    """Keep the received global mask (packed, 1 bit per coordinate) and its version."""
    state[_HELD_MASK] = ArrayRecord({name: Array(np.packbits(m.reshape(-1).numpy(), bitorder="little"))
                                     for name, m in masks.items()})
    state[_HELD_META] = ConfigRecord({MASK_VERSION: version})


def check_held_version(state: RecordDict, version: int) -> None:
    """An error when this node does not hold global mask ``version``."""
    held = int(state[_HELD_META][MASK_VERSION]) if _HELD_META in state else None
    if held != version:
        raise RuntimeError(f"the server sent no mask bitmap for global mask version {version}, but this node "
                           f"holds {'no mask' if held is None else f'version {held}'} (was its state lost?); "
                           f"the server resends the bitmap to a node whose reply reports another version")


def held_mask(state: RecordDict, reference: Mapping[str, torch.Tensor], version: int) -> Masks:
    """The held global mask; an error when this node does not hold ``version``."""
    check_held_version(state, version)
    record = state[_HELD_MASK]
    return {name: torch.from_numpy(np.unpackbits(record[name].numpy(), count=reference[name].numel(),
                                                 bitorder="little").astype(bool)).reshape(reference[name].shape)
            for name in record}


def bitmap_codec_from(config: ConfigRecord, key: str) -> BitmapCodec:
    codec = get_codec(str(config.get(key, "bitmap_fp32")))
    if not isinstance(codec, BitmapCodec):
        raise ValueError(f"the masked trainer sends and receives bitmap codecs; config[{key!r}] names {codec.name!r}")
    return codec
