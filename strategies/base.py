"""What every strategy of this project shares, on top of Flower's Message-API ``FedAvg``.

* Seeded sampling over partitions (``fl.sampling``) instead of Flower's ``random.sample``, so
  the same seed trains the same clients on every engine.
* Payload codecs (``fl.payload``): the down codec encodes the broadcast, the up codec is named
  in the message config and decodes the replies.
* Replies are put in partition order before aggregation, so floating-point sums do not depend
  on which client finished first.
* ``state_dict()``/``load_state_dict()`` for whatever must survive a checkpoint.

The algorithm itself (configure, train, aggregate) is written out in each strategy's own file.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fl.directory import NodeDirectory
from fl.keys import ARRAYS, CODEC, CONFIG, METRICS, SERVER_ROUND, UP_CODEC
from fl.payload import State, get_codec
from fl.sampling import sample_partitions


class FederatedStrategy(FlowerFedAvg):
    def __init__(self, *, seed: int = 0, down_codec: str = "dense_fp32", up_codec: str = "dense_fp32",
                 **flower_kwargs: Any):
        super().__init__(**flower_kwargs)
        self.seed = seed
        self.down_codec = get_codec(down_codec)
        self.up_codec = get_codec(up_codec)
        self.reference: State | None = None  # names, shapes and dtypes of the global model
        self._directory: NodeDirectory | None = None

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

    def decode_replies(self, replies: Sequence[Message]) -> tuple[list[State], list[float]]:
        states = [self.up_codec.decode(reply.content[ARRAYS], self.reference) for reply in replies]
        weights = [float(reply.content[METRICS][self.weighted_by_key]) for reply in replies]
        return states, weights

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> State:
    """sum_k n_k w_k / sum_k n_k per tensor, accumulated in float64 in the given order.

    Integer buffers (BatchNorm's ``num_batches_tracked``) get the rounded weighted mean.
    """
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    out: State = {}
    for name, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights):
            acc.add_(state[name].to(torch.float64), alpha=weight / total)
        out[name] = acc.round().to(first.dtype) if not first.is_floating_point() else acc.to(first.dtype)
    return out
