"""The ``delta`` trainer and evaluator: a DELTA-factorized client (XDELTA's federated use case).

One round on client k with tier width w_k:

    1. decode the download (channel-slice codec): the DELTA's width-w_k prefix blocks, and E + the
       base classifier when the server says this client lacks their current version; those are
       kept in the node's persistent state (Flower ``Context.state``) for later rounds
    2. build the width-w_k fused model (``fl.delta.network.FusedDelta`` of ``arch.scaled(w_k)``)
    3. E epochs of SGD on the client's training split with E and the base classifier frozen:
           CE(base_classifier(fused), y) + lambda_FNC * L_FNC + lambda_SR * group lasso
       (the central construction's MSE to the base's features needs the base, which a client does
       not hold; the labels take its place). On edge-training rounds E trains too.
    4. upload the DELTA's width-w_k blocks (+ E on edge rounds), nothing else

The evaluator scores the received width-w_k fused model on the client's held-out split.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord
from torch.func import functional_call

from clients.resident import borrowed_model
from clients.trainer import ClientEnv, Session, hyper_from, register_evaluator, register_trainer, slice_codec_from
from fl.compute import model_device, to_cpu
from fl.delta.network import Branches, DeltaArch, FusedDelta, fnc_loss, fuse, group_lasso
from fl.delta.slices import (ARCH, FNC_WEIGHT, FROZEN_META, FROZEN_STATE, FROZEN_VERSION, SR_WEIGHT, TRAIN_EDGE,
                             VAL_FRACTION, WIDTH, WITH_FROZEN, download_layout, is_frozen, same_keep,
                             template_state, upload_layout)
from fl.local_training import ClientData, RunningMetrics, evaluate
from fl.vectorized import State, sgd_steps
from fl.message_keys import CODEC, NUM_EXAMPLES, UP_CODEC
from fl.payload import shared_decode

NAME = "delta"  # the trainer and evaluator name the server puts in config["trainer"]
TIER_WIDTH = "tier_width"  # metric: the client's width


@dataclass(frozen=True)
class DeltaClientSettings:
    arch_json: str
    width: float
    with_frozen: bool
    frozen_version: int
    train_edge: bool
    fnc: float
    sr: float
    val_fraction: float

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "DeltaClientSettings":
        return cls(str(config[ARCH]), float(config[WIDTH]), bool(config[WITH_FROZEN]), int(config[FROZEN_VERSION]),
                   bool(config.get(TRAIN_EDGE, False)), float(config[FNC_WEIGHT]), float(config[SR_WEIGHT]),
                   float(config[VAL_FRACTION]))


@register_trainer(NAME)
@contextmanager
def delta(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> Iterator[Session]:
    s = DeltaClientSettings.from_config(config)
    full = template_state(s.arch_json)
    with tier_model(s, env.device) as model:
        # 1-2. the width-w fused model with E and the classifier this node holds
        model.load_state_dict(receive(arrays, config, env, s, full, env.device))
        train_data, _ = env.local_splits(s.val_fraction)

        def train() -> dict[str, float]:
            # 3. local training, E (unless an edge round) and the base classifier frozen
            metrics = train_fused(model, train_data, config, s, env.generator)
            return {**metrics, TIER_WIDTH: s.width, NUM_EXAMPLES: len(train_data)}

        def reply() -> ArrayRecord:
            # 4. upload the width-w blocks (+ E on edge rounds)
            return upload(to_cpu(model.state_dict()), config, s, full)

        yield Session(model, train, reply)


@register_evaluator(NAME)
def delta_evaluate(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> dict[str, float]:
    """The received width-w fused model on this client's held-out split."""
    s = DeltaClientSettings.from_config(config)
    full = template_state(s.arch_json)
    with tier_model(s, env.device) as model:
        model.load_state_dict(receive(arrays, config, env, s, full, env.device))
        _, held_out = env.local_splits(s.val_fraction)
        return {**evaluate(model, held_out), TIER_WIDTH: s.width, NUM_EXAMPLES: len(held_out)}


# -- steps -------------------------------------------------------------------------------------------------

def receive(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv, s: DeltaClientSettings,
            full: dict[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The width-w model's whole state: the received DELTA blocks, E and the classifier (received
    now, or kept from an earlier round in the node's state), on ``device`` (None: the CPU).

    Decoded once per record (``fl.payload.shared_decode``): the server sends one download per
    tier (and with or without E and C_B) a round, and the nodes that received E and C_B in one
    download keep one record of them, so a round decodes, and copies to the device, each once.
    The returned tensors are shared: load them into a model, never modify them."""
    codec = slice_codec_from(config, CODEC, NAME)
    tag = (codec.name, s.arch_json, s.width, s.with_frozen)

    def decode() -> dict[str, torch.Tensor]:
        reference, keep = download_layout(full, s.arch_json, s.width, s.with_frozen)
        blocks, got = codec.decode_slices(arrays, reference)
        if not same_keep(got, keep):
            raise ValueError(f"the download is not the width-{s.width} slice this client expects")
        return blocks

    blocks = shared_decode(arrays, tag, decode, device)
    if s.with_frozen:
        received = shared_decode(arrays, tag, decode)
        env.state[FROZEN_STATE] = shared_decode(arrays, (*tag, "held"), lambda: ArrayRecord(
            {n: t.contiguous() for n, t in received.items() if is_frozen(n)}))
        env.state[FROZEN_META] = ConfigRecord({"version": s.frozen_version})
        return blocks
    meta = env.state[FROZEN_META] if FROZEN_META in env.state else None
    if FROZEN_STATE not in env.state or meta is None or int(meta["version"]) != s.frozen_version:
        have = None if meta is None else int(meta["version"])
        raise RuntimeError(f"this node holds version {have} of the edge model and base classifier, the round "
                           f"needs version {s.frozen_version}; the server sends them when it believes a node lacks them")
    held = env.state[FROZEN_STATE]
    return {**shared_decode(held, "held", held.to_torch_state_dict, device), **blocks}


def train_fused(model: FusedDelta, data: ClientData, config: ConfigRecord, s: DeltaClientSettings,
                generator: torch.Generator) -> dict[str, float]:
    hyper = hyper_from(config)
    training_mode(model, s)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=hyper.lr, momentum=hyper.momentum, weight_decay=hyper.weight_decay)
    device = model_device(model)
    running = RunningMetrics()
    for _ in range(hyper.epochs):
        for x, y in data.batches(hyper.batch_size, generator, device=device):
            if s.train_edge:
                parts = model.branches(x)
            else:
                with torch.no_grad():
                    edge = model.edge_outputs(x)
                parts = fuse(model, model.delta(x), *edge)
            loss, logits = fused_loss(model, s, parts, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running.add(loss, logits, y)
    model.eval()
    return running.means()[0]


def train_fused_vectorized(model: FusedDelta, receiveds: Sequence[State], datas: Sequence[ClientData],
                           config: ConfigRecord, s: DeltaClientSettings,
                           generators: Sequence[torch.Generator]) -> tuple[list[State], list[dict[str, float]]]:
    """``train_fused`` for K clients of one tier (same width, config and step schedule) as one vmap
    (``fl.vectorized.sgd_steps``): each client from its own received state, with its own data and
    generator; returns their state dicts and metrics. ``model`` is a scratch width-w model on the
    device the clients train on: its weights are overwritten."""
    hyper = hyper_from(config)
    training_mode(model, s)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    device = model_device(model)
    keys = list(model.state_dict().keys())
    stacked = {name: torch.stack([r[name] for r in receiveds]).to(device) for name in keys}
    objective = _FusedObjective(model, s)

    def loss_of(state: State, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return functional_call(objective, {f"model.{name}": t for name, t in state.items()}, (x, y))

    metrics = sgd_steps(stacked, trainable, datas, hyper, generators, 1, loss_of)
    model.eval()
    return [{name: stacked[name][i].clone() for name in keys} for i in range(len(datas))], metrics


class _FusedObjective(nn.Module):
    """One batch's loss of ``train_fused`` (and its logits) as a module, for ``functional_call``."""

    def __init__(self, model: FusedDelta, s: DeltaClientSettings):
        super().__init__()
        self.model, self.s = model, s

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model, s = self.model, self.s
        parts = model.branches(x) if s.train_edge else fuse(model, model.delta(x), *model.edge_outputs(x))
        return fused_loss(model, s, parts, y)


def fused_loss(model: FusedDelta, s: DeltaClientSettings, parts: Branches,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's local objective and its logits: CE(C_B(fused), y) + lambda_FNC L_FNC + lambda_SR group lasso."""
    logits = model.classifier(parts.fused)
    loss = F.cross_entropy(logits, y)
    if s.fnc:
        loss = loss + s.fnc * fnc_loss(parts.delta_out, parts.edge_out)
    if s.sr:
        loss = loss + s.sr * group_lasso(model.delta)
    return loss, logits


def upload(state: State, config: ConfigRecord, s: DeltaClientSettings, full: State) -> ArrayRecord:
    """The reply's arrays: the trained width-w blocks (+ E on edge rounds) of ``state`` (on the CPU)."""
    reference, keep = upload_layout(full, s.arch_json, s.width, s.train_edge)
    return slice_codec_from(config, UP_CODEC, NAME).encode_slices({name: state[name] for name in reference}, keep)


# -- helpers -------------------------------------------------------------------------------------------------

def training_mode(model: FusedDelta, s: DeltaClientSettings) -> None:
    """The base classifier frozen, and E unless it trains this round (then in eval mode too)."""
    model.freeze(edge=not s.train_edge)
    model.train()
    if not s.train_edge:
        model.edge.eval()


def tier_model(s: DeltaClientSettings, device: torch.device):
    """A resident width-w fused model on ``device`` (weights are whatever the last user left: load them)."""
    arch = DeltaArch.from_json(s.arch_json)
    tier = arch if s.width == 1.0 else arch.scaled(s.width)
    return borrowed_model((NAME, s.arch_json, s.width, str(device)), lambda: FusedDelta(tier).to(device))


__all__ = ["NAME", "DeltaClientSettings", "delta", "delta_evaluate", "receive", "train_fused", "train_fused_vectorized",
           "upload"]
