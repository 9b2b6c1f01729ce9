"""Client trainers, chosen by name, and the session protocol the ClientApp runs them by.

The server names the trainer in each train message (``config["trainer"]``, default ``dense``), so
one ClientApp serves every strategy. A trainer is a context manager ``(arrays, config, env) ->
Session``: entering it receives the payload into the model it trains; the session's ``train()``
is the algorithm's local step and ``reply()`` what it uploads. The ClientApp wraps every session
in the plugins' client hooks (``run_trainer``), so no trainer calls them: ``before_train`` when
the session starts the round's local training, ``after_train`` when it ends it (both, except for
the exchanges in the middle of AgileNN's split learning, where one round spans many messages).

Evaluate messages name the trainer the same way: a trainer that needs its own evaluation (a pruned
architecture, a personal split) registers an evaluator ``(arrays, config, env) -> metrics`` under
the same name; other names are evaluated densely. A trainer knows nothing of Flower's transport,
Ray or the engine: ``ClientEnv`` hands it the client's data, its persistent state, a seeded
generator and a resident model on the run's compute device (``fl.compute``: ``env.device``; the
trainer loads the received CPU tensors into it and encodes its reply from ``fl.compute.to_cpu``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import torch
import torch.nn as nn
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.resident import borrowed_model
from fl.compute import resolve_compute
from fl.data import client_split
from fl.hooks import ClientView, Plugin
from fl.local_training import ClientData, TrainHyper
from fl.message_keys import (BATCH_SIZE, BN_STATS, CONFIG, EPOCHS, LR, MOMENTUM, PARTITION_ID, SERVER_ROUND,
                             WEIGHT_DECAY)
from fl.payload import SliceCodec, get_codec
from fl.registry import Registry
from fl.sampling import seed_for
from fl.specs import ClientSpec

TRAINER = "trainer"  # config key naming the trainer

@dataclass
class Session:
    """One train message's local training, in the parts the ClientApp runs with the plugins' hooks
    between them (``run_trainer``)."""

    model: nn.Module  # what trains, the received weights loaded
    train: Callable[[], dict[str, float]]  # the local step; its metrics
    reply: Callable[[], ArrayRecord]  # the upload, after train()
    starts: bool = True  # this message starts the round's local training (before_train runs)
    ends: bool = True  # ... and this one ends it (after_train runs)


Trainer = Callable[[ArrayRecord, ConfigRecord, "ClientEnv"], ContextManager[Session]]
TRAINERS: Registry[Trainer] = Registry("client trainer", "strategy.trainer")


def run_trainer(trainer: Trainer, arrays: ArrayRecord, config: ConfigRecord,
                env: "ClientEnv") -> tuple[ArrayRecord, dict[str, float]]:
    """A train message through ``trainer``, wrapped in the plugins' client hooks."""
    with trainer(arrays, config, env) as session:
        if session.starts:
            for plugin in env.plugins:
                plugin.before_train(env.view, session.model, config)
        metrics = session.train()
        if session.ends:
            for plugin in env.plugins:
                extra = plugin.after_train(env.view, session.model, metrics) or {}
                metrics.update({f"plugin/{plugin.name}/{k}": v for k, v in extra.items()})
        return session.reply(), metrics


Evaluator = Callable[[ArrayRecord, ConfigRecord, "ClientEnv"], dict[str, float]]
EVALUATORS: Registry[Evaluator] = Registry("client evaluator", "strategy.trainer")


def register_trainer(name: str) -> Callable[[Trainer], Trainer]:
    return TRAINERS.register(name)


def register_evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
    return EVALUATORS.register(name)


def evaluator_for(config: ConfigRecord) -> Evaluator:
    """The evaluator registered under the message's trainer name, else the dense one."""
    name = str(config.get(TRAINER, "dense"))
    return EVALUATORS.get(name if name in EVALUATORS else "dense")


@dataclass
class ClientEnv:
    spec: ClientSpec
    federation: Any
    data: ClientData
    partition_id: int
    server_round: int
    state: RecordDict  # the node's Flower Context.state: persists across rounds on this node
    generator: torch.Generator
    plugins: list[Plugin] = field(default_factory=list)
    device: torch.device = torch.device("cpu")  # where this node computes (the run's ``compute``, resolved here)

    @classmethod
    def for_message(cls, spec: ClientSpec, msg: Message, context: Context,
                    plugins: list[Plugin] | None = None) -> "ClientEnv":
        """The environment of the node ``context`` for ``msg``: its partition's data, its persistent
        state, the generator seeded from (run seed, round, partition) and the compute device
        (``spec.compute`` resolved in this process: the node's own GPU, if any, for ``auto``)."""
        partition = int(context.node_config[PARTITION_ID])
        federation = spec.data.federation()
        server_round = int(msg.content[CONFIG].get(SERVER_ROUND, 0))
        return cls(spec=spec, federation=federation,
                   data=ClientData(federation.train, federation.client_indices[partition]),
                   partition_id=partition, server_round=server_round, state=context.state,
                   generator=torch.Generator().manual_seed(seed_for(spec.seed, server_round, partition)),
                   plugins=list(plugins or []), device=resolve_compute(spec.compute))

    @property
    def view(self) -> ClientView:
        return ClientView(partition_id=self.partition_id, server_round=self.server_round, state=self.state)

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        """A resident instance of the run's model on ``device`` (weights are whatever the last user left)."""
        fed = self.federation  # the same model spec builds different shapes for different data
        key = (self.spec.model, fed.num_classes, fed.channels, fed.image_size, str(self.device))
        with borrowed_model(key, lambda: self.spec.model.build_for(fed).to(self.device)) as model:
            yield model

    def local_splits(self, val_fraction: float) -> tuple[ClientData, ClientData]:
        """(training split, held-out split) of this client's samples, fixed by the run seed; with no
        held-out share, both are all of its samples."""
        if val_fraction <= 0:
            return self.data, self.data
        train_idx, held_idx = client_split(self.federation, self.partition_id, val_fraction, self.spec.seed)
        images = self.federation.train
        return ClientData(images, np.asarray(train_idx)), ClientData(images, np.asarray(held_idx))


def slice_codec_from(config: ConfigRecord, key: str, trainer: str) -> SliceCodec:
    """The channel-slice codec named by ``config[key]``; a trainer that sends slices needs one."""
    codec = get_codec(str(config[key]))
    if not isinstance(codec, SliceCodec):
        raise ValueError(f"the {trainer} trainer sends channel slices; {key}={codec.name!r} is not a channel-slice codec")
    return codec


def hyper_from(config: ConfigRecord) -> TrainHyper:
    """The message's training settings; a key it omits (a stock Flower strategy sends ``lr`` at most)
    takes ``TrainHyper``'s default, which is the CLI's (``sim_configs/config.yaml``, ``train:``)."""
    d = TrainHyper()
    return TrainHyper(epochs=int(config.get(EPOCHS, d.epochs)), batch_size=int(config.get(BATCH_SIZE, d.batch_size)),
                      lr=float(config.get(LR, d.lr)), momentum=float(config.get(MOMENTUM, d.momentum)),
                      weight_decay=float(config.get(WEIGHT_DECAY, d.weight_decay)),
                      bn_stats=str(config.get(BN_STATS, d.bn_stats)))
