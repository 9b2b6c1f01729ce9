"""The ``hermes`` trainer and evaluator: a Hermes client (Li et al., "Hermes: an efficient federated
learning framework for heterogeneous mobile clients", MobiCom 2021, Sections 3-4).

One round on client k, holding the channel mask m_k (only ever shrinks):

    1. decode its kept channels + channel bitmap (``channel_slice_*`` codec) and build the
       physically smaller model: torch-pruning removes the pruned channels from a copy of the
       dense architecture (``clients.channels``), then the received blocks are loaded into it
    2. E epochs of SGD on its training split (``fl.local_training.train_dense``)
    3. local accuracy on its held-out split (``fl.data.client_split``, ``val_fraction``)
    4. if local accuracy >= the threshold and some layer is below the target: prune ``step`` of
       each conv/linear layer's remaining output channels (classifier excepted) with the lowest
       L1 filter norm (Li et al., ICLR 2017), with the coupled input slices and BatchNorm entries
       (m_k shrinks)
    5. upload the trained values on the new m_k + its channel bitmap, the local accuracy, the
       pruned fraction and the training-split size (the aggregation weight)

Physically smaller rather than a masked dense model: that is what Hermes runs on the device
(fewer MACs and less memory, the point of pruning there), and it makes "pruned weights stay
pruned" hold by construction; a masked dense model computes the same function (a test checks
it) at dense cost. The held-out split serves both the pruning decision (step 3) and the
personalized evaluation (the ``hermes`` evaluator): it is the client's own test data.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from flwr.app import ArrayRecord, ConfigRecord

from clients.channels import ChannelPruner, pruned_fraction
from clients.trainer import ClientEnv, Session, hyper_from, register_evaluator, register_trainer, slice_codec_from
from fl.compute import to_cpu
from fl.errors import ConfigError
from fl.local_training import evaluate, train_dense
from fl.message_keys import CODEC, NUM_EXAMPLES, UP_CODEC
from fl.payload import kept_entries, relative_keep, slice_state

NAME = "hermes"  # the trainer and evaluator name the server puts in config["trainer"]
# Config keys (server -> client) and metric keys (client -> server).
ACCURACY_THRESHOLD = "hermes.accuracy-threshold"
PRUNE_STEP = "hermes.prune-step"
TARGET_PRUNED = "hermes.target-pruned"
VAL_FRACTION = "hermes.val-fraction"
LOCAL_ACCURACY = "local_accuracy"
PRUNED_FRACTION = "pruned_fraction"
KEPT_ENTRIES = "kept_entries"
PRUNED_NOW = "pruned_now"


@dataclass(frozen=True)
class HermesSettings:
    """Hermes's client-side knobs, sent in every train/evaluate message."""

    accuracy_threshold: float = 0.5  # prune once local accuracy reaches this
    prune_step: float = 0.2  # share of each layer's remaining channels pruned per step
    target_pruned: float = 0.5  # share of each layer's channels a client may prune at most
    val_fraction: float = 0.2  # the client's held-out split (pruning decision, personalized accuracy)

    def __post_init__(self):
        checks = (("accuracy_threshold", 0.0 <= self.accuracy_threshold <= 1.0, "[0, 1]"),
                  ("prune_step", 0.0 < self.prune_step < 1.0, "(0, 1)"),
                  ("target_pruned", 0.0 <= self.target_pruned < 1.0, "[0, 1)"),
                  ("val_fraction", 0.0 < self.val_fraction < 1.0, "(0, 1)"))
        for key, ok, interval in checks:
            if not ok:
                raise ConfigError(f"strategy.{key}", f"must be in {interval}, got {getattr(self, key)}")

    def to_config(self) -> dict[str, float]:
        return {ACCURACY_THRESHOLD: self.accuracy_threshold, PRUNE_STEP: self.prune_step,
                TARGET_PRUNED: self.target_pruned, VAL_FRACTION: self.val_fraction}

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "HermesSettings":
        return cls(float(config[ACCURACY_THRESHOLD]), float(config[PRUNE_STEP]), float(config[TARGET_PRUNED]),
                   float(config[VAL_FRACTION]))


@register_trainer(NAME)
@contextmanager
def hermes(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> Iterator[Session]:
    settings = HermesSettings.from_config(config)
    pruner = channel_pruner(env)
    # 1. the client's own sub-network, physically pruned
    blocks, keep = slice_codec_from(config, CODEC, "hermes").decode_slices(arrays, pruner.reference)
    masks = pruner.masks_of(keep)
    model, graph = pruner.build(masks)  # pruned on the CPU, then trained on the compute device
    model.to(env.device).load_state_dict(blocks)
    train_data, held_out = env.local_splits(settings.val_fraction)
    new_keep = keep  # step 4 may prune further

    def train() -> dict[str, float]:
        nonlocal new_keep
        # 2. local training
        metrics = train_dense(model, train_data, hyper_from(config), env.generator)
        # 3. local accuracy
        local = evaluate(model, held_out)
        # 4. one more pruning step once accurate enough
        new_masks = masks
        if local["accuracy"] >= settings.accuracy_threshold:
            new_masks = pruner.next_masks(model, masks, settings.prune_step, settings.target_pruned, graph)
        pruned_now = any(not torch.equal(new_masks[name], masks[name]) for name in masks)
        new_keep = pruner.keep(new_masks) if pruned_now else keep
        return {**metrics, LOCAL_ACCURACY: local["accuracy"], PRUNED_FRACTION: pruned_fraction(new_masks),
                KEPT_ENTRIES: kept_entries(new_keep, pruner.reference), PRUNED_NOW: float(pruned_now),
                NUM_EXAMPLES: len(train_data)}

    def reply() -> ArrayRecord:
        # 5. upload the kept channels of the trained model
        upload = slice_state(to_cpu(model.state_dict()), relative_keep(keep, new_keep))
        return slice_codec_from(config, UP_CODEC, "hermes").encode_slices(upload, new_keep)

    yield Session(model, train, reply)


@register_evaluator(NAME)
def hermes_evaluate(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> dict[str, float]:
    """Personalized accuracy: the received (personalized) sub-network on the held-out split."""
    settings = HermesSettings.from_config(config)
    pruner = channel_pruner(env)
    blocks, keep = slice_codec_from(config, CODEC, "hermes").decode_slices(arrays, pruner.reference)
    model, _ = pruner.build(pruner.masks_of(keep))
    model.to(env.device).load_state_dict(blocks)
    _, held_out = env.local_splits(settings.val_fraction)
    return {**evaluate(model, held_out), PRUNED_FRACTION: pruned_fraction(pruner.masks_of(keep)),
            NUM_EXAMPLES: len(held_out)}


# -- helpers -------------------------------------------------------------------------------------

_pruners: dict[tuple, ChannelPruner] = {}
_pruners_lock = threading.Lock()


def channel_pruner(env: ClientEnv) -> ChannelPruner:
    """The process's ``ChannelPruner`` for the run's model (its groups are found once)."""
    fed = env.federation
    key = (env.spec.model, fed.num_classes, fed.channels, fed.image_size)
    with _pruners_lock:
        if key not in _pruners:
            with env.model() as model:
                _pruners[key] = ChannelPruner(model, torch.zeros(1, fed.channels, fed.image_size, fed.image_size))
        return _pruners[key]
