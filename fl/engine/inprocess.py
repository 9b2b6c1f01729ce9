"""The ``inprocess`` engine: a Flower ``Grid`` that hands each Message straight to the ClientApp.

Flower's simulation engine routes every message through a LinkState that the ServerApp polls
and through Ray actors; on one small machine that costs 1.2x to 2.2x the training time and 3x to
4x the memory of a plain PyTorch loop (docs/engines.md). This grid keeps
the Message API contract (``push_messages``/``pull_messages``/``send_and_receive``, one
``Context`` per node that persists across rounds, errors returned as error replies) and runs the
ClientApp calls on a pool of worker threads in this process, where datasets and model objects
stay resident between rounds.

Threads rather than processes, by measurement on the 2-core machine: two threads with torch's
intra-op threads set to 1 trained 100 clients per round in 0.91x the time of a plain 2-thread
loop at the same memory; two forked processes took 1.0x to 1.15x the time and 1.3x to 3x the
memory. ``bench/engine_overhead.py`` re-measures this against the plain loop and Ray.

Worker threads allocate from their own glibc malloc arenas, which do not hand freed pages back to
the system by themselves: without a trim the process grew from 1,341 to 1,497 MiB between rounds
1 and 4 at N=1000 (peak 1,597 MiB, against 1,466 with the trim) while the single-threaded plain
loop stayed at 1,219 MiB (docs/engines.md). The grid trims once per
``send_and_receive``, when the workers are idle (``release_freed_memory``).

With ``batch`` (``engine.batch_clients=K``), the train messages that ``batch.batchable`` accepts
are delivered in the chunks ``batch.chunks`` makes (at most ``batch.size`` each) to ``batch`` itself, which answers each with the
reply the ClientApp would send (``clients.batched``: dense clients trained as one vmap, by
``fl.vectorized``); a chunk that raises is delivered again one message at a time, so a failing
client still gets its own error reply.

Nothing is held per registered node until a message reaches it: node ``i + 1`` holds partition
``i``, node ids are a ``range``, a node's ``Context`` is created on its first message, and the
node directory is two arithmetic mappings (``ConsecutiveIds``), so a million registered nodes of
which a hundred train per round cost what a hundred do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import operator
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Protocol
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fl.message_keys import NUM_PARTITIONS, PARTITION_ID
from fl.node_directory import NodeDirectory


class ClientBatching(Protocol):
    """Answers several messages at once with the replies the ClientApp would send, in order."""

    size: int  # the most messages per call

    def batchable(self, message: Message) -> bool: ...

    def chunks(self, messages: list[Message], workers: int) -> list[list[Message]]: ...

    def __call__(self, work: list[tuple[Message, Context]]) -> list[Message]: ...


class InProcessGrid(Grid):
    """Delivers Messages to ``client_app`` on ``workers`` threads; node ``i + 1`` holds partition ``i``."""

    def __init__(self, client_app: ClientApp, num_nodes: int, *, workers: int = 2, run_id: int = 1,
                 batch: ClientBatching | None = None):
        if num_nodes < 1:
            raise ValueError("num_nodes must be at least 1")
        self._app = client_app
        self._run = Run.create_empty(run_id)
        identify_as_server(run_id)
        self._run_id = run_id
        self._node_ids = range(1, num_nodes + 1)
        self._contexts: dict[int, Context] = {}  # created on a node's first message
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="client")
        self._workers = workers
        self._pending: dict[str, Future[Message]] = {}
        self._lock = threading.Lock()
        self._batch = batch if batch is not None and batch.size > 1 else None
        self._watcher: Callable[[Message], None] | None = None

    # -- Grid API --------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self._node_ids

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids, batched = [], []
        for message in messages:
            if message.metadata.dst_node_id not in self._node_ids:
                raise ValueError(f"message addressed to unknown node {message.metadata.dst_node_id}")
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self._run.run_id
            if self._batch is not None and self._batch.batchable(message):
                batched.append(message)
                with self._lock:
                    self._pending[message_id] = Future()
            else:
                with self._lock:
                    self._pending[message_id] = self._pool.submit(self._deliver, message)
            ids.append(message_id)
        if batched:
            for chunk in self._batch.chunks(batched, self._workers):  # type: ignore[union-attr]
                with self._lock:
                    futures = [self._pending[m.metadata.message_id] for m in chunk]
                self._pool.submit(self._deliver_batch, chunk, futures)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        with self._lock:
            for message_id in message_ids:
                future = self._pending.get(message_id)
                if future is not None and future.done():
                    replies.append(self._pending.pop(message_id).result())
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push all messages, wait for their replies (or ``timeout``), return them in push order."""
        ids = list(self.push_messages(messages))
        with self._lock:
            futures = [self._pending[i] for i in ids]
        wait(futures, timeout=timeout)
        replies = []
        with self._lock:
            for message_id, future in zip(ids, futures):
                if future.done():
                    del self._pending[message_id]
                    replies.append(future.result())
        release_freed_memory()
        return replies

    # -- beyond the Grid API ---------------------------------------------------------------

    def partition_of(self, node_id: int) -> int:
        """The partition a node holds; lets the server skip the discovery query."""
        if node_id not in self._node_ids:
            raise KeyError(node_id)
        return int(node_id) - 1

    def node_directory(self) -> NodeDirectory:
        """The whole partition <-> node mapping without a query or a dict entry per node."""
        return _ConsecutiveDirectory(ConsecutiveIds(len(self._node_ids), shift=1))

    def node_states(self) -> dict[int, RecordDict]:
        """The persistent ``Context.state`` of every node that has received a message (for
        checkpoints; the others' state is empty, as a fresh context's)."""
        with self._lock:
            return {node_id: context.state for node_id, context in self._contexts.items()}

    def restore_node_states(self, states: dict[int, RecordDict]) -> None:
        for node_id, state in states.items():
            self._context(int(node_id)).state = state

    def watch_replies(self, watcher: Callable[[Message], None] | None) -> None:
        """Hand each sound reply to ``watcher`` on the worker thread that produced it, before the
        reply is handed back (None: stop). The server screens replies this way while the other
        clients still train; an exception in ``watcher`` is ignored (the server screens that
        reply again itself)."""
        self._watcher = watcher

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _context(self, node_id: int) -> Context:
        """Node ``node_id``'s persistent context, created on first use."""
        with self._lock:
            context = self._contexts.get(node_id)
            if context is None:
                if node_id not in self._node_ids:
                    raise KeyError(node_id)
                context = Context(run_id=self._run_id, node_id=node_id,
                                  node_config={PARTITION_ID: node_id - 1, NUM_PARTITIONS: len(self._node_ids)},
                                  state=RecordDict(), run_config={})
                self._contexts[node_id] = context
            return context

    def _deliver(self, message: Message) -> Message:
        context = self._context(message.metadata.dst_node_id)
        started = time.time()
        try:
            reply = self._app(message, context)
        except Exception as exc:  # a failing client becomes an error reply, as in Flower's engine
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        return self._watched(_stamped(reply, started))

    def _watched(self, reply: Message) -> Message:
        watcher = self._watcher
        if watcher is not None and not reply.has_error():
            try:
                watcher(reply)
            except Exception:  # the server screens the reply itself
                pass
        return reply

    def _deliver_batch(self, messages: list[Message], futures: list[Future[Message]]) -> None:
        """Answer ``messages`` with one call of the batch handler; if it raises, one at a time."""
        started = time.time()
        try:
            work = [(m, self._context(m.metadata.dst_node_id)) for m in messages]
            replies = [_stamped(r, started) for r in self._batch(work)]  # type: ignore[misc]
        except Exception:
            replies = [self._deliver(m) for m in messages]
        else:
            replies = [self._watched(r) for r in replies]
        for future, reply in zip(futures, replies):
            future.set_result(reply)


def _stamped(reply: Message, started: float) -> Message:
    reply.metadata.__dict__["_message_id"] = str(uuid4())
    reply.metadata.__dict__["_delivered_at"] = str(started)
    return reply


class ConsecutiveIds(Mapping[int, int]):
    """The mapping ``{k: k + shift for k in keys}`` over consecutive ``keys`` (``range(start, start
    + n)``), answered by arithmetic; ``inverse()`` maps the values back."""

    def __init__(self, n: int, shift: int, start: int = 0):
        self.keys_range = range(start, start + n)
        self.shift = shift

    def __getitem__(self, key: int) -> int:
        if not self.__contains__(key):
            raise KeyError(key)
        return operator.index(key) + self.shift

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys_range)

    def __len__(self) -> int:
        return len(self.keys_range)

    def __contains__(self, key: object) -> bool:
        try:
            return not isinstance(key, bool) and operator.index(key) in self.keys_range
        except TypeError:
            return False

    def values(self) -> range:  # type: ignore[override]  (a range: set() and sorted() of it are fast)
        return range(self.keys_range.start + self.shift, self.keys_range.stop + self.shift)

    def inverse(self) -> ConsecutiveIds:
        return ConsecutiveIds(len(self), -self.shift, self.keys_range.start + self.shift)

    def __repr__(self) -> str:
        return f"ConsecutiveIds({self.keys_range} -> +{self.shift})"


class _ConsecutiveDirectory(NodeDirectory):
    """A ``NodeDirectory`` over ``ConsecutiveIds``: its inverse is arithmetic too."""

    @property
    def partition_of_node(self) -> Mapping[int, int]:  # type: ignore[override]
        return self.node_of_partition.inverse()


def _load_malloc_trim():
    path = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(path), "malloc_trim", None) if path else None
    except OSError:
        return None


_malloc_trim = _load_malloc_trim()  # glibc only; None elsewhere (musl, macOS)


def release_freed_memory() -> None:
    """Return the free pages of every malloc arena to the system (glibc's ``malloc_trim(0)``, as
    Dask's workers do for the same reason); a no-op where the C library has no such call."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def identify_as_server(run_id: int) -> None:
    """Messages take their run and sender ids from Flower's process-wide ``TaskIdentity``;
    set it as Flower's own in-process simulation API (``run_simulation``) does."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
