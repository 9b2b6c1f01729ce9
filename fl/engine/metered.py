"""Counts the bytes of every message the ServerApp sends and receives, on any Grid.

Wrapping the Grid (rather than instrumenting strategies) means every strategy, a user's plain
Flower strategy included, is metered the same way, with ``fl.payload.payload_bytes`` as the one
measure. Traffic accumulates per node until the run's round reporter closes the round.

``query.*`` messages (the one-time partition discovery of ``fl.node_directory``, which the in-process
engine does not need) are control traffic: counted in ``control_bytes``, not in a round's
up/down bytes, so that both engines report the same model traffic; their error and missing replies
(a ClientApp that does not answer the query) are not training failures.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fl.clock import ClockSpec
from fl.engine.inprocess import InProcessGrid
from fl.message_keys import CONFIG, EPOCHS, METRICS, NUM_EXAMPLES, PARTITION_ID
from fl.payload import payload_bytes


@dataclass(frozen=True)
class RoundTraffic:
    up_bytes: int
    down_bytes: int
    clients: int  # nodes whose training reply was kept
    failures: int  # error replies and missing replies
    per_client_up: np.ndarray  # upload bytes of each node that replied to training
    stragglers: int = 0  # replies dropped for missing the virtual clock's deadline
    sim_s: float = 0.0  # the round's duration on the virtual clock (0 without one)


class MeteredGrid(Grid):
    """``clock`` (optional): times every client on its device profile and drops stragglers."""

    def __init__(self, inner: Grid, clock: ClockSpec | None = None, num_partitions: int = 0):
        self.inner = inner
        self.clock = clock
        self._profiles = clock.assign(num_partitions) if clock is not None else []
        self._partition_of: dict[int, int] = {}
        self._stragglers = 0
        self._stragglers_now = 0  # dropped by the clock in the call being counted (not failures)
        self._sim_s = 0.0
        self._up: dict[int, int] = defaultdict(int)
        self._down: dict[int, int] = defaultdict(int)
        self._train_up: dict[int, int] = {}
        self._failures = 0
        self.control_bytes = 0

    def watch_replies(self, watcher: Callable[[Message], None] | None) -> None:
        """The engine's ``watch_replies`` where it has one (the in-process grid); else nothing."""
        watch = getattr(self.inner, "watch_replies", None)
        if watch is not None:
            watch(watcher)

    def close_round(self) -> RoundTraffic:
        traffic = RoundTraffic(
            up_bytes=sum(self._up.values()),
            down_bytes=sum(self._down.values()),
            clients=len(self._train_up),
            failures=self._failures,
            per_client_up=np.array(sorted(self._train_up.values()), dtype=np.int64),
            stragglers=self._stragglers,
            sim_s=self._sim_s,
        )
        self._stragglers, self._sim_s = 0, 0.0
        self._up.clear()
        self._down.clear()
        self._train_up.clear()
        self._failures = 0
        return traffic

    # -- metering ----------------------------------------------------------------------------

    def _count_out(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        sizes: dict[int, int] = {}  # a broadcast shares one content object: size it once
        for message in messages:
            content = message.content
            if id(content) not in sizes:
                sizes[id(content)] = payload_bytes(content)
            if _is_control(message):
                self.control_bytes += sizes[id(content)]
            else:
                self._down[message.metadata.dst_node_id] += sizes[id(content)]
        return messages

    def _count_in(self, replies: Iterable[Message], sent: int | None = None) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if _is_control(reply):  # its errors and missing replies are the querier's business, not failures
                if reply.has_content():
                    self.control_bytes += payload_bytes(reply.content)
                    if PARTITION_ID in reply.content.get(METRICS, {}):
                        self._partition_of[reply.metadata.src_node_id] = int(reply.content[METRICS][PARTITION_ID])
                continue
            if reply.has_error():
                self._failures += 1
                continue
            size = payload_bytes(reply.content)
            node = reply.metadata.src_node_id
            self._up[node] += size
            if reply.metadata.message_type.startswith("train"):
                self._train_up[node] = self._train_up.get(node, 0) + size
        if sent is not None:
            self._failures += sent - len(replies) - self._stragglers_now
            self._stragglers_now = 0
        return replies

    # -- Grid API, delegated -----------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._count_out(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._count_in(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = self._count_out(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if self.clock is not None and messages and not _is_control(messages[0]):
            replies = self._on_the_clock(messages, replies)
        return self._count_in(replies, sent=None if messages and _is_control(messages[0]) else len(messages))

    def _on_the_clock(self, messages: list[Message], replies: list[Message]) -> list[Message]:
        """Time each reply on its node's device; drop those past the deadline; advance the clock."""
        sent = {m.metadata.message_id: m for m in messages}
        down_sizes = {id(m.content): payload_bytes(m.content) for m in messages}
        deadline = self.clock.deadline_s
        kept, slowest = [], 0.0
        for reply in replies:
            request = sent.get(reply.metadata.reply_to_message_id)
            if request is None or reply.has_error():
                kept.append(reply)
                continue
            partition = self._partition(reply.metadata.src_node_id)
            config = request.content.get(CONFIG, {})
            seconds = self.clock.client_seconds(
                self._profiles[partition], samples=int(reply.content[METRICS].get(NUM_EXAMPLES, 0)),
                epochs=int(config.get(EPOCHS, 1)), train=request.metadata.message_type.startswith("train"),
                down_bytes=down_sizes[id(request.content)], up_bytes=payload_bytes(reply.content))
            if deadline is not None and seconds > deadline:
                self._stragglers += 1
                self._stragglers_now += 1
                continue
            kept.append(reply)
            slowest = max(slowest, seconds)
        self._sim_s += deadline if deadline is not None and len(kept) < len(replies) else slowest
        return kept

    def _partition(self, node_id: int) -> int:
        partition_of = getattr(self.inner, "partition_of", None)
        if partition_of is not None:
            return partition_of(node_id)
        # A deployed node with only a local data folder reports no partition: a stable stand-in.
        return self._partition_of.get(node_id, node_id % max(len(self._profiles), 1))

    def node_states(self) -> dict[int, RecordDict]:
        """The nodes' persistent state where it lives in this process (the in-process engine), for a
        checkpoint; Ray's and deployed nodes keep their own."""
        return self.inner.node_states() if isinstance(self.inner, InProcessGrid) else {}

    def restore_node_states(self, states: dict[int, RecordDict]) -> None:
        if isinstance(self.inner, InProcessGrid):
            self.inner.restore_node_states(states)

    def __getattr__(self, name: str):  # e.g. InProcessGrid.partition_of
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _is_control(message: Message) -> bool:
    return message.metadata.message_type.startswith("query")
