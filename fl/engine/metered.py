"""Counts the bytes of every message the ServerApp sends and receives, on any Grid.

Wrapping the Grid (rather than instrumenting strategies) means every strategy, a user's plain
Flower strategy included, is metered the same way, with ``fl.payload.payload_bytes`` as the one
measure. Traffic accumulates per node until the run's round reporter closes the round.

``query.*`` messages (the one-time partition discovery of ``fl.directory``, which the in-process
engine does not need) are control traffic: counted in ``control_bytes``, not in a round's
up/down bytes, so that both engines report the same model traffic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fl.payload import payload_bytes


@dataclass(frozen=True)
class RoundTraffic:
    up_bytes: int
    down_bytes: int
    clients: int  # nodes that returned a training reply
    failures: int  # error replies and missing replies
    per_client_up: np.ndarray  # upload bytes of each node that replied to training


class MeteredGrid(Grid):
    def __init__(self, inner: Grid):
        self.inner = inner
        self._up: dict[int, int] = defaultdict(int)
        self._down: dict[int, int] = defaultdict(int)
        self._train_up: dict[int, int] = {}
        self._failures = 0
        self.control_bytes = 0

    def close_round(self) -> RoundTraffic:
        traffic = RoundTraffic(
            up_bytes=sum(self._up.values()),
            down_bytes=sum(self._down.values()),
            clients=len(self._train_up),
            failures=self._failures,
            per_client_up=np.array(sorted(self._train_up.values()), dtype=np.int64),
        )
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
            if reply.has_error():
                self._failures += 1
                continue
            size = payload_bytes(reply.content)
            if _is_control(reply):
                self.control_bytes += size
                continue
            node = reply.metadata.src_node_id
            self._up[node] += size
            if reply.metadata.message_type.startswith("train"):
                self._train_up[node] = self._train_up.get(node, 0) + size
        if sent is not None:
            self._failures += sent - len(replies)
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
        return self._count_in(self.inner.send_and_receive(messages, timeout=timeout), sent=len(messages))

    def __getattr__(self, name: str):  # e.g. InProcessGrid.partition_of
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _is_control(message: Message) -> bool:
    return message.metadata.message_type.startswith("query")
