"""Client trainers: plain functions ``(arrays, config, env) -> (arrays, metrics)`` chosen by name.

The server names the trainer in each train message (``config["trainer"]``, default ``dense``), so
one ClientApp serves every strategy. Evaluate messages name it the same way: a trainer that needs
its own evaluation (a pruned architecture, a personal split) registers an evaluator
``(arrays, config, env) -> metrics`` under the same name; other names are evaluated densely.
A trainer knows nothing of Flower's transport, Ray or the engine: ``ClientEnv`` hands it the
client's data, its persistent state, a seeded generator, a resident model and the plugin hooks.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.resident import borrowed_model
from fl.data import client_split
from fl.hooks import ClientView, Plugin
from fl.keys import BATCH_SIZE, BN_STATS, EPOCHS, LR, MOMENTUM, WEIGHT_DECAY
from fl.local_training import ClientData, TrainHyper
from fl.payload import SliceCodec, get_codec
from fl.registry import Registry
from fl.specs import ClientSpec

TRAINER = "trainer"  # config key naming the trainer

Trainer = Callable[[ArrayRecord, ConfigRecord, "ClientEnv"], tuple[ArrayRecord, dict[str, float]]]
TRAINERS: Registry[Trainer] = Registry("client trainer", "strategy.trainer")


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

    @property
    def view(self) -> ClientView:
        return ClientView(partition_id=self.partition_id, server_round=self.server_round, state=self.state)

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        """A resident instance of the run's model (weights are whatever the last user left)."""
        fed = self.federation  # the same model spec builds different shapes for different data
        key = (self.spec.model, fed.num_classes, fed.channels, fed.image_size)
        with borrowed_model(key, lambda: self.spec.model.build_for(fed)) as model:
            yield model

    def local_splits(self, val_fraction: float) -> tuple[ClientData, ClientData]:
        """(training split, held-out split) of this client's samples, fixed by the run seed; with no
        held-out share, both are all of its samples."""
        if val_fraction <= 0:
            return self.data, self.data
        train_idx, held_idx = client_split(self.federation, self.partition_id, val_fraction, self.spec.seed)
        images = self.federation.train
        return ClientData(images, np.asarray(train_idx)), ClientData(images, np.asarray(held_idx))

    def before_train(self, model: nn.Module, config: ConfigRecord) -> None:
        for plugin in self.plugins:
            plugin.before_train(self.view, model, config)

    def after_train(self, model: nn.Module, metrics: dict[str, float]) -> dict[str, float]:
        extra: dict[str, float] = {}
        for plugin in self.plugins:
            extra.update({f"plugin/{plugin.name}/{k}": v for k, v in (plugin.after_train(self.view, model, metrics) or {}).items()})
        return extra


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
