"""Hermes-like (Li, Sun, Li, Pu, Li, Chen, "Hermes: an efficient federated learning framework for
heterogeneous mobile clients", MobiCom 2021): every client learns its own structured-pruned
sub-network, and only those sub-networks travel; the server averages overlapping parameters.

    server state: the dense-shaped global model w; per client k its channel mask m_k (every
                  channel until k first prunes; only ever shrinks) and its personalized model
                  p_k (its latest upload: the values on m_k)
    configure:    sample clients with the run's seeded sampler; send client k only w on m_k,
                  its kept channels + a channel bitmap (``channel_slice_*`` codec, fl.payload)
    train:        (clients.hermes_trainer) train the physically pruned sub-network; measure the
                  local accuracy on the client's held-out split; when it reaches
                  ``accuracy_threshold`` and a layer is below ``target_pruned``, prune
                  ``prune_step`` of each conv/linear layer's remaining channels by lowest L1
                  filter norm, Li et al. 2017's criterion (m_k shrinks); upload the values on
                  the new m_k + its bitmap
    aggregate:    per coordinate i, with H_i the participants whose mask holds i and n_k the
                  size of client k's training split (sample weighting):
                    count:  w_i <- sum_{k in H_i} n_k w_k,i / sum_{k in H_i} n_k   if H_i is not empty
                    all:    the same, but only where H_i is every participant of the round
                  every other coordinate keeps its global value w_i. Under ``all`` what a subset
                  of participants learned on a coordinate stays in their personalized models
                  only; the global model moves on the common core alone.
                  Then m_k <- the uploaded mask (checked to be a subset of the old one), p_k <- upload.
    evaluate:     global accuracy: the dense w on the central test set (the run does it every
                  round); personalized accuracy: federated evaluation (``fraction_evaluate`` > 0)
                  sends client k its p_k (w on m_k if k never trained), evaluated on its
                  held-out split; logged as ``fed_eval/personalized_accuracy``.

Coordinates no client holds any more (pruned by all) keep their last value in w, so the dense
global model stays a well-defined network for central evaluation. Masks live on the server under
the partition id, not the node id, so a run is the same on every engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clients.hermes_trainer import NAME, HermesSettings
from clients.trainer import TRAINER
from fl.errors import ConfigError
from fl.message_keys import ARRAYS, CONFIG, METRICS
from fl.payload import (Keep, State, full_keep, keep_coordinates, kept_entries,
                        relative_keep, slice_state, unslice_state)
from strategies.base import Decoded, FederatedStrategy, Rejected, Update

# Which coordinates take the holders' average: f(holder weight sum, held by every participant).
HOLDERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "count": lambda weight, held_by_all: weight > 0,
    "all": lambda weight, held_by_all: held_by_all,
}


@dataclass(frozen=True)
class Upload:
    partition: int
    blocks: State  # the client's kept values, block by block
    keep: Keep  # its channel masks (after this round's pruning)
    weight: float  # its training-split size


class Hermes(FederatedStrategy):
    payload_family = "slice"  # kept channels + channel bitmap: codec.up=fp16 is its fp16 codec (fl.payload.family)

    def __init__(self, *, accuracy_threshold: float = 0.5, prune_step: float = 0.2, target_pruned: float = 0.5,
                 val_fraction: float = 0.2, aggregation: str = "count", **kwargs: Any):
        super().__init__(**kwargs)
        self.settings = HermesSettings(accuracy_threshold, prune_step, target_pruned, val_fraction)
        if aggregation not in HOLDERS:
            raise ConfigError("strategy.aggregation", f"unknown mode {aggregation!r}; allowed: {', '.join(HOLDERS)}")
        self.aggregation = aggregation
        self.global_state: State | None = None
        self.masks: dict[int, Keep] = {}  # partition -> channel masks (absent: every channel)
        self.personal: dict[int, State] = {}  # partition -> its latest upload (blocks on its mask)

    # -- configure: each sampled client gets the global model on its own channels -------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        self.reference = self.global_state = arrays.to_torch_state_dict()
        nodes = self.sample(grid, server_round, "train", self.fraction_train, self.min_train_nodes)
        config = self.client_config(config, server_round, up=True)
        return [Message(RecordDict({ARRAYS: self.download(self.partition(node)), CONFIG: config}), node,
                        MessageType.TRAIN) for node in nodes]

    def download(self, partition: int) -> ArrayRecord:
        """w on m_k: exactly client k's kept coordinates, plus its channel bitmap."""
        keep = self.keep_of(partition)
        return self.down_codec.encode_slices(slice_state(self.global_state, keep), keep)

    # -- aggregate: average each coordinate over the participants that hold it ---------------

    def aggregate_updates(self, server_round: int,
                          updates: Sequence[Update]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        uploads = [u.content for u in updates]
        self.global_state = self.server_update(server_round, uploads)
        for upload in uploads:
            self.masks[upload.partition] = upload.keep
            self.personal[upload.partition] = upload.blocks
        metrics = self.client_metrics(updates)
        metrics["kept_share_all_clients"] = self.kept_share()
        return ArrayRecord(self.global_state), metrics

    def decode_update(self, server_round: int, reply: Message) -> Decoded:
        """Client k's kept values and channel bitmap; its mask may only shrink."""
        partition = self.partition(reply.metadata.src_node_id)
        blocks, keep = self.up_codec.decode_slices(reply.content[ARRAYS], self.global_state)
        try:
            relative_keep(self.keep_of(partition), keep)
        except ValueError as exc:
            raise Rejected(str(exc)) from None
        upload = Upload(partition, blocks, keep, float(reply.content[METRICS][self.weighted_by_key]))
        return Decoded(blocks, slice_state(self.global_state, keep), upload)

    def server_update(self, server_round: int, uploads: Sequence[Upload]) -> State:
        return average_held(self.global_state, uploads, HOLDERS[self.aggregation])

    # -- evaluate: each client's personalized model on its own held-out split ------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        self.global_state = arrays.to_torch_state_dict()
        nodes = self.sample(grid, server_round, "evaluate", self.fraction_evaluate, self.min_evaluate_nodes)
        config = self.client_config(config, server_round, up=False)
        return [Message(RecordDict({ARRAYS: self.personalized(self.partition(node)), CONFIG: config}), node,
                        MessageType.EVALUATE) for node in nodes]

    def personalized(self, partition: int) -> ArrayRecord:
        keep = self.keep_of(partition)
        blocks = self.personal.get(partition)
        if blocks is None:  # never trained: the global model on its (full) mask
            blocks = slice_state(self.global_state, keep)
        return self.down_codec.encode_slices(blocks, keep)

    def aggregate_evaluations(self, server_round: int, replies: Sequence[Message]) -> MetricRecord | None:
        metrics = self.evaluate_metrics_aggr_fn([reply.content for reply in replies], self.weighted_by_key)
        return MetricRecord({f"personalized_{key}": value for key, value in metrics.items()})

    # -- helpers ---------------------------------------------------------------------------------

    def client_config(self, config: ConfigRecord, server_round: int, *, up: bool) -> ConfigRecord:
        out = ConfigRecord({**config, TRAINER: NAME, **self.settings.to_config()})
        return self.stamp(out, server_round, down=self.down_codec.name, up=self.up_codec.name if up else None)

    def partition(self, node: int) -> int:
        return self._directory.partition_of_node[node] if self._directory else node

    def keep_of(self, partition: int) -> Keep:
        return self.masks[partition] if partition in self.masks else full_keep(self.global_state)

    def kept_share(self) -> float:
        """Share of the dense model's coordinates an average client holds (never-trained: all)."""
        total = sum(t.numel() for t in self.global_state.values())
        clients = len(self._directory) if self._directory else len(self.masks)
        held = sum(kept_entries(keep, self.global_state) for keep in self.masks.values())
        return (held + total * max(clients - len(self.masks), 0)) / (total * max(clients, 1))

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "global": self.global_state,
                "masks": {p: dict(keep) for p, keep in self.masks.items()},
                "personal": {p: dict(blocks) for p, blocks in self.personal.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.global_state = state["global"]
        self.reference = self.global_state
        self.masks = {int(p): {n: tuple(m) for n, m in keep.items()} for p, keep in state["masks"].items()}
        self.personal = {int(p): dict(blocks) for p, blocks in state["personal"].items()}


def average_held(global_state: Mapping[str, torch.Tensor], uploads: Sequence[Upload],
                 holders: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> State:
    """Each coordinate's sample-weighted mean over the uploads holding it, where ``holders`` says so;
    the global value elsewhere. Accumulated in float64 in the given order; integer buffers (held by
    every client) get the rounded weighted mean."""
    if not uploads or sum(u.weight for u in uploads) <= 0:
        raise ValueError("aggregation needs uploads with positive weights")
    num = {name: torch.zeros(g.shape, dtype=torch.float64) for name, g in global_state.items()}
    den = {name: torch.zeros(g.shape, dtype=torch.float64) for name, g in global_state.items()}
    every = {name: torch.ones(g.shape, dtype=torch.bool) for name, g in global_state.items()}
    zeros = {name: torch.zeros(g.shape, dtype=torch.float64) for name, g in global_state.items()}
    for upload in uploads:
        dense = unslice_state({k: v.to(torch.float64) for k, v in upload.blocks.items()}, upload.keep, zeros)
        for name, g in global_state.items():
            held = keep_coordinates(upload.keep[name], g.shape)
            num[name].add_(dense[name], alpha=upload.weight)
            den[name].add_(held.to(torch.float64), alpha=upload.weight)
            every[name] &= held
    out: State = {}
    for name, g in global_state.items():
        take = holders(den[name], every[name])
        mean = num[name] / den[name].clamp_min(torch.finfo(torch.float64).tiny)
        if not g.is_floating_point():
            mean = mean.round()
        out[name] = torch.where(take, mean, g.to(torch.float64)).to(g.dtype)
    return out
