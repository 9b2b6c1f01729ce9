"""What every strategy of this project shares, on top of Flower's Message-API ``FedAvg``.

* Seeded sampling over partitions (``fl.sampling``) instead of Flower's ``random.sample``, so
  the same seed trains the same clients on every engine.
* Payload codecs (``fl.payload``): the down codec encodes the broadcast, the up codec is named
  in the message config and decodes the replies.
* Replies are put in partition order before aggregation, so floating-point sums do not depend
  on which client finished first.
* Every update is validated before aggregation (``accept``): keys, shapes and dtypes as the
  codec sends them, all values finite, payload size within the codec's bound. A rejected update
  is logged with its client, round and reason, counted, and never reaches the aggregate; a round
  with fewer than ``min_train_nodes`` accepted updates keeps the global model.
* ``state_dict()``/``load_state_dict()`` for whatever must survive a checkpoint.

The algorithm itself (configure, train, aggregate) is written out in each strategy's own file.
"""

from __future__ import annotations

import logging
from collections import abc
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fl.directory import NodeDirectory
from fl.keys import ARRAYS, CODEC, CONFIG, METRICS, SERVER_ROUND, UP_CODEC
from fl.payload import State, example_payload, get_codec
from fl.sampling import sample_partitions

log = logging.getLogger(__name__)


class FederatedStrategy(FlowerFedAvg):
    def __init__(self, *, seed: int = 0, down_codec: str = "dense_fp32", up_codec: str = "dense_fp32",
                 **flower_kwargs: Any):
        super().__init__(**flower_kwargs)
        self.seed = seed
        self.down_codec = get_codec(down_codec)
        self.up_codec = get_codec(up_codec)
        self.reference: State | None = None  # names, shapes and dtypes of the global model
        self._directory: NodeDirectory | None = None
        self.rejections: dict[int, list[str]] = {}  # round -> "partition p: reason" for each rejected update

    # -- sampling ----------------------------------------------------------------------------

    def directory(self, grid: Grid) -> NodeDirectory:
        nodes = set(grid.get_node_ids())
        if self._directory is None or set(self._directory.node_of_partition.values()) != nodes:
            self._directory = NodeDirectory.discover(grid, min_nodes=self.min_available_nodes)
        return self._directory

    def sample(self, grid: Grid, server_round: int, purpose: str, fraction: float, minimum: int) -> list[int]:
        """Node ids of ``max(int(fraction * N), minimum)`` partitions drawn from the run seed."""
        directory = self.directory(grid)
        k = max(int(len(directory) * fraction), minimum)
        partitions = sample_partitions(self.seed, server_round, purpose, list(directory.node_of_partition), k)
        return [directory.node_of_partition[p] for p in partitions]

    def in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        partition_of = self._directory.partition_of_node if self._directory else {}
        return sorted(replies, key=lambda m: partition_of.get(m.metadata.src_node_id, m.metadata.src_node_id))

    def broadcast(self, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        """One content object for every sampled node of a round (decoded once per process)."""
        key = (id(arrays), config.get(SERVER_ROUND))
        if getattr(self, "_broadcast_key", None) != key:
            payload = arrays if self.down_codec.name == "dense_fp32" else self.down_codec.encode(self.reference)
            self._broadcast = RecordDict({ARRAYS: payload, CONFIG: config})
            self._broadcast_key = key
        return self._broadcast

    def stamp(self, config: ConfigRecord, server_round: int, *, down: str, up: str | None = None) -> ConfigRecord:
        config[SERVER_ROUND] = server_round
        config[CODEC] = down
        if up is not None:
            config[UP_CODEC] = up
        return config

    # -- validation ------------------------------------------------------------------------------

    def accept(self, server_round: int, replies: Sequence[Message]) -> list[Message]:
        """The replies whose update passes ``validate``; the others are logged and counted."""
        partition_of = self._directory.partition_of_node if self._directory else {}
        accepted, rejected = [], []
        layout = PayloadLayout.of(self.up_codec, self.reference) if self.reference is not None else None
        for reply in replies:
            reason = self.validate(reply, layout)
            if reason is None:
                accepted.append(reply)
            else:
                who = partition_of.get(reply.metadata.src_node_id, reply.metadata.src_node_id)
                rejected.append(f"partition {who}: {reason}")
                log.warning("round %d: rejected the update of partition %s: %s", server_round, who, reason)
        self.rejections[server_round] = rejected
        return accepted

    def validate(self, reply: Message, layout: "PayloadLayout | None") -> str | None:
        """Why ``reply``'s update must not be aggregated, or None if it may be."""
        content = reply.content
        if ARRAYS not in content or METRICS not in content or self.weighted_by_key not in content[METRICS]:
            return f"reply lacks {ARRAYS!r} or {METRICS!r}[{self.weighted_by_key!r}]"
        weight = content[METRICS][self.weighted_by_key]
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            return f"{self.weighted_by_key} is {weight!r}"
        return layout.check(content[ARRAYS]) if layout is not None else None

    def decode_replies(self, replies: Sequence[Message]) -> tuple[Sequence[State], list[float]]:
        """The replies' states, decoded one at a time as they are read (``DecodedStates``), and
        their aggregation weights."""
        weights = [float(reply.content[METRICS][self.weighted_by_key]) for reply in replies]
        return DecodedStates(self.up_codec, self.reference, replies), weights

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])


@dataclass(frozen=True)
class PayloadLayout:
    """What a sound payload of ``codec`` looks like for a model: array names, dtypes, shapes, and a
    size bound (the larger of the codec's and the dense fp32 encoding, plus 1%)."""

    codec_name: str
    arrays: dict[str, tuple[str, list[int]]]
    bound: int

    @classmethod
    def of(cls, codec, reference: Mapping[str, Any]) -> "PayloadLayout":
        expected = example_payload(codec, reference)
        bound = max(expected.count_bytes(), get_codec("dense_fp32").encode(reference).count_bytes())
        return cls(codec.name, {k: (a.dtype, list(a.shape)) for k, a in expected.items()}, int(bound * 1.01) + 1024)

    def check(self, record: ArrayRecord) -> str | None:
        size = record.count_bytes()
        if size > self.bound:
            return f"payload of {size} bytes exceeds the {self.codec_name} bound of {self.bound}"
        if list(record.keys()) != list(self.arrays):
            missing, extra = sorted(set(self.arrays) - set(record)), sorted(set(record) - set(self.arrays))
            return f"arrays differ from the {self.codec_name} layout: missing {missing[:3]}, unexpected {extra[:3]}"
        for name, array in record.items():
            dtype, shape = self.arrays[name]
            if array.dtype != dtype or list(array.shape) != shape:
                return f"{name!r} is {array.dtype}{list(array.shape)}, expected {dtype}{shape}"
            try:
                values = array.numpy()
            except Exception as exc:
                return f"{name!r} does not decode ({type(exc).__name__}: {exc})"
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"{name!r} has non-finite values"
        return None


class DecodedStates(abc.Sequence):
    """Replies' payloads decoded on access, so that aggregating N updates holds one decoded state
    at a time next to the replies, not N of them (80 x 2 MiB for ``cnn_small`` at N=100)."""

    def __init__(self, codec, reference: Mapping[str, torch.Tensor], replies: Sequence[Message]):
        self.codec, self.reference, self.replies = codec, reference, list(replies)

    def __len__(self) -> int:
        return len(self.replies)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.codec.decode(self.replies[i].content[ARRAYS], self.reference)


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> State:
    """sum_k n_k w_k / sum_k n_k per tensor, accumulated in float64 in the given order.

    One pass over the states (each is read once: a ``DecodedStates`` decodes it then), adding it to
    every tensor's accumulator; per tensor the terms are added in the states' order.
    Integer buffers (BatchNorm's ``num_batches_tracked``) get the rounded weighted mean.
    """
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for state, weight in zip(states, weights):
        for name, tensor in state.items():
            if name not in acc:
                acc[name], dtypes[name] = torch.zeros(tensor.shape, dtype=torch.float64), tensor.dtype
            acc[name].add_(tensor.to(torch.float64), alpha=weight / total)
    return {name: a.round().to(dtypes[name]) if not dtypes[name].is_floating_point else a.to(dtypes[name])
            for name, a in acc.items()}
