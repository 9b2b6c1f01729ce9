"""Which node holds which data partition, so that sampling can be seeded over partitions.

Node ids are random on Flower's engines (and on a real SuperLink), so sampling node ids with a
seeded generator would still pick different data on different engines. Strategies sample
partition ids and map them to nodes through this directory. The in-process grid knows the
mapping; on any other grid the server asks every node once with a ``query.partition`` message
(the ClientApp answers with its ``partition-id`` node config). Nodes that report no partition
(a device with only a local data folder) get ids after the reported ones, in node-id order.
A deployed device may also report its DELTA tier (``delta-tier``, from its device profile or node
config); the directory keeps it by partition for the DELTA strategy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl.keys import CONFIG, DELTA_TIER, METRICS, PARTITION_ID, QUERY_PARTITION


@dataclass(frozen=True)
class NodeDirectory:
    node_of_partition: dict[int, int]
    reported_tier: dict[int, int] = field(default_factory=dict)  # partition -> the tier its device reported

    @property
    def partition_of_node(self) -> dict[int, int]:
        return {node: partition for partition, node in self.node_of_partition.items()}

    def __len__(self) -> int:
        return len(self.node_of_partition)

    @classmethod
    def discover(cls, grid: Grid, min_nodes: int = 1, timeout: float = 600.0) -> "NodeDirectory":
        """Wait until ``min_nodes`` nodes are connected (as Flower's ``sample_nodes`` does), then map them."""
        deadline = time.time() + timeout
        while len(node_ids := sorted(grid.get_node_ids())) < min_nodes:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of {min_nodes} nodes connected within {timeout:.0f} s")
            time.sleep(0.1)
        partition_of = getattr(grid, "partition_of", None)
        if partition_of is not None:
            return cls({partition_of(node): node for node in node_ids})
        queries = [Message(RecordDict({CONFIG: ConfigRecord()}), node, QUERY_PARTITION) for node in node_ids]
        reported: dict[int, int] = {}
        tiers: dict[int, int] = {}  # node -> reported tier
        for reply in grid.send_and_receive(queries, timeout=timeout):
            if not reply.has_content():
                continue
            metrics = reply.content[METRICS]
            if PARTITION_ID in metrics:
                reported[reply.metadata.src_node_id] = int(metrics[PARTITION_ID])
            if DELTA_TIER in metrics:
                tiers[reply.metadata.src_node_id] = int(metrics[DELTA_TIER])
        mapping = {partition: node for node, partition in reported.items()}
        next_id = max(mapping, default=-1) + 1
        for node in node_ids:
            if node not in reported:
                mapping[next_id] = node
                next_id += 1
        return cls(mapping, {partition: tiers[node] for partition, node in mapping.items() if node in tiers})
