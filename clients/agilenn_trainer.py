"""The ``agilenn`` client trainer (Huang and Gao, MobiCom 2022), for ``strategies.agilenn``.

The message config names the phase (``agilenn.phase``):

    pretrain  E epochs of SGD on CE(reference(extractor(x)), y) (section 4.1); on the selection
              round the reply also carries Algorithm 1's top-k counts per channel and quantiles
              of the remote feature values (the centroids' start) as metrics
    agile     E epochs of AgileNN steps on the whole split network (remote head included, for
              FedAvg): lambda CE + (1 - lambda)(skewness + disorder), importance by
              differentiable 2-point IG against the frozen reference; upload everything
    split     one exchange of split learning: apply the server's gradients for the previous
              batch (recomputing its forward pass), then send the next batch's coded remote
              features, local logits, labels and w; after the last batch, upload the device
              part (extractor, local head, w, centroids)

With ``agilenn.probe`` = n > 0 an agile round also times n batches of AgileNN steps against
plain steps of the same network on a copy of the model (``step_overhead``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from clients.trainer import ClientEnv, Session, hyper_from, register_trainer
from fl.batchnorm import smallest_batch
from fl.compute import model_device, to_cpu
from fl.local_training import batch_bounds, statistics_after, statistics_before
from fl.message_keys import CODEC, UP_CODEC
from fl.payload import (decode_shared, decode_tensors, encode_features, encode_reply, encode_tensors, get_codec)
from plugins.agilenn.losses import disorder_loss, disorder_rate, skewness, skewness_loss
from plugins.agilenn.network import AgileNet
from plugins.agilenn.protocol import (AGILE, ALPHA_W, CENTROID_PREFIX, COUNT_PREFIX, DONE, GRAD_ALPHA, GRAD_FEATURES,
                                      GRAD_LOCAL, LABELS, LAMBDA, LAST, LOCAL, NAME, PHASE, PRETRAIN, PROBE, RHO,
                                      SELECT, SPLIT, STEP)
from plugins.agilenn.selection import topk_counts
from plugins.agilenn.training import AgileHyper, AgileLoss, pretrain_loss, step_overhead, train_epochs

_STATE, _MOMENTUM, _RECEIVED = "agilenn.device", "agilenn.momentum", "agilenn.received"
_BN = "agilenn.bn-statistics"  # split mode, train.bn_stats=global: the received weights' statistics


def agile_hyper(config: ConfigRecord) -> AgileHyper:
    return AgileHyper(rho=float(config.get(RHO, 0.8)), lam=float(config.get(LAMBDA, 0.8)))


@register_trainer(NAME)
@contextmanager
def agilenn(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> Iterator[Session]:
    phase = str(config.get(PHASE, AGILE))
    if phase == SPLIT:
        with split_exchange(arrays, config, env) as session:
            yield session
        return
    with env.model() as model:
        down = get_codec(str(config.get(CODEC, "dense_fp32")))
        received = decode_shared(down, arrays, model.state_dict())  # on the CPU: what the reply's update subtracts
        model.load_state_dict(decode_shared(down, arrays, model.state_dict(), env.device))
        hyper = hyper_from(config)

        def train() -> dict[str, float]:
            if phase == PRETRAIN:
                model.freeze_reference(False)
                before = statistics_before(model, env.data, hyper, model.reference_logits)  # extractor and reference
                metrics = train_epochs(model, env.data, hyper, env.generator, pretrain_loss)
                statistics_after(model, env.data, hyper, before, model.reference_logits)
                model.freeze_reference(True)
                if bool(config.get(SELECT, False)):
                    metrics.update(selection_statistics(model, env))
                return metrics
            model.freeze_reference(True)
            agile = AgileLoss(agile_hyper(config), env.federation.num_classes)
            probe = int(config.get(PROBE, 0))
            if probe > 0:
                batches = [b for _, b in zip(range(probe), env.data.batches(hyper.batch_size, None, device=env.device))]
                overhead = step_overhead(model, batches, agile, hyper)
            before = statistics_before(model, env.data, hyper)  # extractor, local and remote heads (not the frozen reference)
            metrics = train_epochs(model, env.data, hyper, env.generator, agile)
            statistics_after(model, env.data, hyper, before)
            if probe > 0:
                metrics.update(overhead)
            return metrics

        up = get_codec(str(config.get(UP_CODEC, "dense_fp32")))
        yield Session(model, train, reply=lambda: encode_reply(up, to_cpu(model.state_dict()), received, env.state))


def selection_statistics(model: AgileNet, env: ClientEnv, batch_size: int = 256) -> dict[str, float]:
    """Algorithm 1's counts (how often each channel is among a sample's top-k importances) and
    quantiles of the remote channels' values, on this client's data."""
    agile = AgileLoss(AgileHyper(), env.federation.num_classes)
    model.eval()
    counts = torch.zeros(model.channels, dtype=torch.int64)
    values = []
    for x, y in env.data.batches(batch_size, None, device=model_device(model)):
        with torch.no_grad():
            f = model.extractor(x)
        importance = agile.importance(model, f, y, create_graph=False).detach()
        counts += topk_counts(importance, model.k).cpu()
        values.append(f.flatten().cpu())
    levels = model.quantizer.levels
    quantiles = torch.quantile(torch.cat(values)[:1_000_000], torch.linspace(0.5 / levels, 1 - 0.5 / levels, levels))
    return {**{f"{COUNT_PREFIX}{c}": float(n) for c, n in enumerate(counts)},
            **{f"{CENTROID_PREFIX}{j}": float(v) for j, v in enumerate(quantiles)}}


# -- split learning: one exchange ---------------------------------------------------------------

def split_batches(env: ClientEnv, batch_size: int, epochs: int, min_size: int) -> list[np.ndarray]:
    """This round's batches (index arrays): the same in every exchange of the round, because the
    round's generator is seeded from (seed, round, partition); a last batch smaller than
    ``min_size`` joins the one before it (``fl.batchnorm.smallest_batch``)."""
    out = []
    for _ in range(epochs):
        order = env.data.indices[torch.randperm(len(env.data), generator=env.generator).numpy()]
        out += [order[s:e] for s, e in batch_bounds(len(order), batch_size, min_size)]
    return out


@contextmanager
def split_exchange(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> Iterator[Session]:
    """One exchange of the round's split learning: it starts the round's local training at step 0
    and ends it with the upload after the last batch (``Session.starts``/``ends``)."""
    step = int(config[STEP])
    hyper = hyper_from(config)
    with env.model() as model:
        batches = split_batches(env, hyper.batch_size, hyper.epochs, smallest_batch(model))
        model.freeze_reference(True)
        names = model.device_state_names()
        params = dict(model.named_parameters())
        trainable = [n for n in names if n in params and params[n].requires_grad]
        optimizer = torch.optim.SGD([params[n] for n in trainable], lr=hyper.lr, momentum=hyper.momentum,
                                    weight_decay=hyper.weight_decay)
        if step == 0:
            reference = {n: t for n, t in model.state_dict().items() if n in names}
            received = get_codec(str(config.get(CODEC, "dense_fp32"))).decode(arrays, reference)
            model.load_state_dict(received, strict=False)
            env.state[_RECEIVED] = ArrayRecord({k: v.contiguous() for k, v in received.items()})
            before = statistics_before(model, env.data, hyper, model.local_logits)
            if before:
                env.state[_BN] = ArrayRecord({k: v.contiguous() for k, v in to_cpu(before).items()})
        else:
            model.load_state_dict(env.state[_STATE].to_torch_state_dict(), strict=False)
            if hyper.momentum > 0 and _MOMENTUM in env.state:
                buffers = env.state[_MOMENTUM].to_torch_state_dict()
                for n in trainable:
                    if n in buffers:
                        optimizer.state[params[n]]["momentum_buffer"] = buffers[n].to(params[n].device)
        last = step >= len(batches)  # all batches done: this exchange uploads the device part for FedAvg
        forwarded: list[ArrayRecord] = []

        def train() -> dict[str, float]:
            metrics = {} if step == 0 else apply_server_gradients(model, optimizer, batches[step - 1], arrays, config, env)
            if last:
                before = env.state[_BN].to_torch_state_dict() if _BN in env.state else None
                statistics_after(model, env.data, hyper, before, model.local_logits)
                return {**metrics, DONE: 1.0}
            forwarded.append(forward_batch(model, batches[step], env))  # the next batch's remote features
            env.state[_STATE] = ArrayRecord({n: t.detach().cpu().clone().contiguous()
                                             for n, t in model.state_dict().items() if n in names})
            momentum = {n: optimizer.state[params[n]]["momentum_buffer"] for n in trainable
                        if optimizer.state.get(params[n], {}).get("momentum_buffer") is not None}
            if momentum:
                env.state[_MOMENTUM] = ArrayRecord({n: b.contiguous() for n, b in to_cpu(momentum).items()})
            return {**metrics, LAST: float(step == len(batches) - 1), "num-examples": len(batches[step])}

        def reply() -> ArrayRecord:
            if not last:
                return forwarded[0]
            device_part = to_cpu({n: t for n, t in model.state_dict().items() if n in names})
            received = env.state[_RECEIVED].to_torch_state_dict()
            record = encode_reply(get_codec(str(config.get(UP_CODEC, "dense_fp32"))), device_part, received, env.state)
            for key in (_STATE, _MOMENTUM, _RECEIVED, _BN):
                env.state.pop(key, None)
            return record

        yield Session(model, train, reply, starts=step == 0, ends=last)


def forward_batch(model: AgileNet, indices: np.ndarray, env: ClientEnv) -> ArrayRecord:
    """The batch's coded remote features, local logits, labels and w; BatchNorm statistics are
    left as they were (the batch's forward pass is recomputed with gradients next exchange)."""
    x, y = (t.to(model_device(model)) for t in env.data.images.get(indices))
    model.train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        f = model.extractor(x)
        local = model.local(f[:, :model.k])
        record = encode_features(model.quantizer.indices(f[:, model.k:]), model.quantizer.codebook())
    for n, b in model.named_buffers():
        b.copy_(buffers[n])
    extra = encode_tensors(to_cpu({LOCAL: local, LABELS: y, ALPHA_W: model.alpha_w.detach().reshape(1)}))
    for name, array in extra.items():
        record[name] = array
    return record


def apply_server_gradients(model: AgileNet, optimizer: torch.optim.Optimizer, indices: np.ndarray,
                           arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> dict[str, float]:
    """Backward through the device part: the server's gradients of lambda * CE on the local
    logits, the (dequantized) remote features and w, plus (1 - lambda)(skewness + disorder)."""
    hyper = agile_hyper(config)
    device = model_device(model)
    x, y = (t.to(device) for t in env.data.images.get(indices))
    grads = {name: g.to(device) for name, g in decode_tensors(arrays, [GRAD_FEATURES, GRAD_LOCAL, GRAD_ALPHA]).items()}
    model.train()
    optimizer.zero_grad(set_to_none=True)
    agile = AgileLoss(hyper, env.federation.num_classes)
    f = model.extractor(x)
    importance = agile.importance(model, f, y)
    regularizer = (1 - hyper.lam) * (skewness_loss(importance, model.k, hyper.rho) + disorder_loss(importance, model.k))
    local = model.local(f[:, :model.k])
    q = model.quantizer(f[:, model.k:])
    torch.autograd.backward([regularizer, local, q, model.alpha_w],
                            [torch.ones((), device=device), grads[GRAD_LOCAL], grads[GRAD_FEATURES],
                             grads[GRAD_ALPHA].reshape(())])
    optimizer.step()
    with torch.no_grad():
        return {"skewness": float(skewness(importance, model.k).mean()),
                "disorder_rate": float(disorder_rate(importance, model.k)),
                "regularizer": float(regularizer)}
