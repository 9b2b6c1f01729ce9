"""Which node holds which data partition, so that sampling can be seeded over partitions.

Node ids are random on Flower's engines (and on a real SuperLink), so sampling node ids with a
seeded generator would still pick different data on different engines. Strategies sample
partition ids and map them to nodes through this directory. The in-process grid knows the
mapping; on any other grid the server asks the nodes once with a ``query.partition`` message
(this project's ClientApp answers with its ``partition-id`` node config). Nodes that report no
partition get ids after the reported ones, in node-id order: a device with only a local data
folder, and any node whose ClientApp does not answer the query (an error reply or none), such as
a stock Flower ClientApp with only ``@app.train()`` and ``@app.evaluate()``. That fallback is
quiet: one log line, no error, and nothing counted as a training failure (the query is control
traffic, ``fl.engine.metered``). The lowest node id is asked first; when its ClientApp has no
query handler at all, the federation is taken to be such ClientApps and the others are not asked.
A stock ClientApp raises on the query, and Flower's simulation engine logs that exception with its
traceback in the server's process: while the first node is asked, the ``flwr`` logger's errors are
held back, and dropped when the answer is that error (this directory's one line says it instead),
else logged as they came. A SuperNode on a device logs it in its own log, on the device.
With ``partition_query=false`` in the run's configuration nobody is asked:
every node takes a partition id in node-id order, and a stock ClientApp sees no query at all. A
node may report more with its partition (a deployed device's DELTA
tier, ``fl.delta.slices.DELTA_TIER``); the directory keeps those numbers by partition
(``reported``) for the strategy whose protocol they belong to.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl.message_keys import CONFIG, METRICS, PARTITION_ID, QUERY_PARTITION

log = logging.getLogger(__name__)

NO_QUERY_HANDLER = "No query function registered"  # Flower's ClientApp error for a type it has no handler for


@dataclass(frozen=True)
class NodeDirectory:
    node_of_partition: dict[int, int]
    reported: dict[int, dict[str, float]] = field(default_factory=dict)  # partition -> what else its node reported

    @property
    def partition_of_node(self) -> dict[int, int]:
        return {node: partition for partition, node in self.node_of_partition.items()}

    def __len__(self) -> int:
        return len(self.node_of_partition)

    @classmethod
    def discover(cls, grid: Grid, min_nodes: int = 1, timeout: float = 600.0, ask: bool = True) -> "NodeDirectory":
        """Wait until ``min_nodes`` nodes are connected (as Flower's ``sample_nodes`` does), then map
        them (``ask=False``: in node-id order, without the partition query)."""
        deadline = time.time() + timeout
        while len(node_ids := sorted(grid.get_node_ids())) < min_nodes:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of {min_nodes} nodes connected within {timeout:.0f} s")
            time.sleep(0.1)
        whole = getattr(grid, "node_directory", None)  # the in-process grid: no dict entry per node
        if whole is not None:
            return whole()
        partition_of = getattr(grid, "partition_of", None)
        if partition_of is not None:
            return cls({partition_of(node): node for node in node_ids})
        if not ask:
            return cls(dict(enumerate(node_ids)))
        reported: dict[int, int] = {}  # node -> reported partition
        extra: dict[int, dict[str, float]] = {}  # node -> the other numbers of its answer
        answer_by = time.time() + timeout  # one wait for both asks
        with flower_errors_held() as held:
            errors = _ask(grid, node_ids[:1], reported, extra, timeout)  # the first node alone (see the docstring)
            stock = any(NO_QUERY_HANDLER in reason for reason in errors.values())
            if stock:
                held.clear()  # Flower's log of that query's failure, which the line below reports
        if not stock:
            errors.update(_ask(grid, node_ids[1:], reported, extra, max(answer_by - time.time(), 1.0)))
        mapping = {partition: node for node, partition in reported.items()}
        next_id = max(mapping, default=-1) + 1
        unreported = [node for node in node_ids if node not in reported]
        for node in unreported:
            mapping[next_id] = node
            next_id += 1
        if unreported:
            why = ("their ClientApp has no partition query handler" if any(NO_QUERY_HANDLER in r for r in errors.values())
                   else "no partition-id in their node config or reply")
            log.info("partition query: %d of %d nodes reported no partition (%s); they take partition ids %d-%d "
                     "in node-id order", len(unreported), len(node_ids), why, next_id - len(unreported), next_id - 1)
        return cls(mapping, {partition: extra[node] for partition, node in mapping.items() if extra.get(node)})


@contextmanager
def flower_errors_held() -> Iterator[list[logging.LogRecord]]:
    """Hold back the ``flwr`` logger's ERROR records until the block ends, then log those still in
    the yielded list (the block may clear it)."""
    flower = logging.getLogger("flwr")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        held.append(record)
        return False

    flower.addFilter(hold)
    try:
        yield held
    finally:
        flower.removeFilter(hold)
        for record in held:
            flower.handle(record)


def _ask(grid: Grid, node_ids: list[int], reported: dict[int, int], extra: dict[int, dict[str, float]],
         timeout: float) -> dict[int, str]:
    """Send the partition query to ``node_ids``; fill ``reported`` and ``extra`` from the answers and
    return the error reason of each node that replied with an error (a missing reply is just absent)."""
    if not node_ids:
        return {}
    queries = [Message(RecordDict({CONFIG: ConfigRecord()}), node, QUERY_PARTITION) for node in node_ids]
    errors: dict[int, str] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            errors[node] = str(reply.error.reason)
            continue
        metrics = reply.content.get(METRICS) if reply.has_content() else None
        if metrics is None:
            continue
        if PARTITION_ID in metrics:
            reported[node] = int(metrics[PARTITION_ID])
        extra[node] = {key: value for key, value in metrics.items() if key != PARTITION_ID}
    return errors
