"""What every strategy of this project shares, on top of Flower's Message-API ``FedAvg``.

* Seeded sampling over partitions (``fl.sampling``) instead of Flower's ``random.sample``, so
  the same seed trains the same clients on every engine.
* Payload codecs (``fl.payload``): the down codec encodes the broadcast, the up codec is named
  in the message config and decodes the replies.
* Replies are put in partition order before aggregation, so floating-point sums do not depend
  on which client finished first.
* Aggregation is a template no strategy can skip: ``aggregate_train`` screens every reply and
  hands only the sound updates, in partition order, to the strategy's ``aggregate_updates``
  (defining ``aggregate_train`` in a subclass is a TypeError). Screening reads the decoded
  content, not only the metadata: the arrays' bytes must match their metadata, the payload must
  decode through the strategy's ``decode_update`` into finite tensors shaped as what the client
  was sent, ``num-examples`` and every other metric must be finite and the weight positive; then
  the robust bounds (``RobustBounds``) refuse a weight or an update norm far above the round's
  lower median. A refused update is logged with its partition, round and reason, counted in
  ``rejections``, and never aggregated; a round with fewer than ``min_train_nodes`` sound
  updates keeps the global model. ``aggregate_evaluate`` likewise drops evaluation replies with
  non-finite metrics before ``aggregate_evaluations``.
* What the server asks beyond Flower's ``Strategy`` (``fl.served.ServedStrategy``):
  ``state_dict()``/``load_state_dict()`` for whatever must survive a checkpoint, and ``rejected(round)``.

The algorithm itself (configure, train, aggregate) is written out in each strategy's own file.
"""

from __future__ import annotations

import logging
import threading
from collections import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fl.message_keys import ARRAYS, CODEC, CONFIG, METRICS, SERVER_ROUND, UP_CODEC
from fl.node_directory import NodeDirectory
from fl.payload import State, array_values, example_payload, get_codec, resolve_codec
from fl.sampling import sample_partitions
from fl.served import ServedStrategy

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A reply that must not be aggregated; the message is the logged reason."""


@dataclass(frozen=True)
class RobustBounds:
    """Bounds relative to the round (the lower median of its sound updates), on by default: they
    stop a client whose weights or ``num-examples`` are orders of magnitude off (3e38 weights,
    1e30 examples) without touching honest rounds. None switches a bound off."""

    max_weight_ratio: float | None = 100.0
    max_norm_ratio: float | None = 100.0

    def __post_init__(self):
        for key in ("max_weight_ratio", "max_norm_ratio"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and value >= 1):
                raise ValueError(f"robust.{key} must be a number >= 1 or null, got {value!r}")


@dataclass(frozen=True)
class Decoded:
    """What ``decode_update`` read from a reply: the tensors the client sent, what it started from
    (same names and shapes, for the update norm; None: the norm of the tensors themselves), and
    whatever the strategy's own aggregation step needs."""

    sent: State
    start: State | None
    content: Any = None


@dataclass(frozen=True)
class Update:
    """A screened reply: its partition, aggregation weight, update norm and decoded content."""

    reply: Message
    partition: int
    weight: float
    norm: float
    content: Any = None


class FederatedStrategy(FlowerFedAvg, ServedStrategy):
    payload_family: ClassVar[str] = "dense"  # what its messages carry: dense, bitmap or slice (fl.payload.family)

    def __init__(self, *, seed: int = 0, down_codec: str = "dense_fp32", up_codec: str = "dense_fp32",
                 robust: RobustBounds | Mapping[str, Any] | None = None, partition_query: bool = True,
                 **flower_kwargs: Any):
        super().__init__(**flower_kwargs)
        self.seed = seed
        self.robust = robust if isinstance(robust, RobustBounds) else RobustBounds(**(robust or {}))
        self.partition_query = partition_query  # False: nodes numbered in node-id order, nobody asked
        self.down_codec = resolve_codec(down_codec, self.payload_family, "codec.down")
        self.up_codec = resolve_codec(up_codec, self.payload_family, "codec.up")
        self.reference: State | None = None  # names, shapes and dtypes of the global model
        self._directory: NodeDirectory | None = None
        self.rejections: dict[int, list[str]] = {}  # round -> "partition p: reason" for each rejected update
        self._layout: PayloadLayout | None = None
        self._layout_for: State | None = None
        self._start64: tuple | None = None  # (round, id, start, its float64 copy) for update norms
        self._prescreened: dict[str, Update | Rejected] = {}  # message id -> screen_one's outcome
        self._caches = threading.Lock()  # the lazy per-round caches, filled from several threads

    # -- sampling ----------------------------------------------------------------------------

    def directory(self, grid: Grid) -> NodeDirectory:
        nodes = set(grid.get_node_ids())
        if self._directory is None or set(self._directory.node_of_partition.values()) != nodes:
            self._directory = NodeDirectory.discover(grid, min_nodes=self.min_available_nodes, ask=self.partition_query)
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

    # -- aggregation: a template every strategy goes through ------------------------------------

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        for name in ("aggregate_train", "aggregate_evaluate"):
            if name in cls.__dict__:
                raise TypeError(f"{cls.__name__} overrides {name}; override its step instead "
                                f"({'aggregate_updates' if name == 'aggregate_train' else 'aggregate_evaluations'}), "
                                "so that no reply reaches it unscreened")

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply (``screen``), then the strategy's own step on the sound updates, in
        partition order. A round with fewer than ``min_train_nodes`` sound updates keeps w_t."""
        answered = self.answered(server_round, replies, MessageType.TRAIN)
        updates = self.screen(server_round, answered)
        if len(updates) < max(self.min_train_nodes, 1):
            return None, None
        return self.aggregate_updates(server_round, updates)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Drop evaluation replies whose metrics are not finite or whose weight is not positive,
        then the strategy's own step (``aggregate_evaluations``)."""
        sound = []
        for reply in self.answered(server_round, replies, MessageType.EVALUATE):
            reason = self.check_metrics(reply, None)
            if reason is None:
                sound.append(reply)
            else:
                log.warning("round %d: ignored the evaluation of partition %s: %s", server_round,
                            self.partition_of(reply), reason)
        return self.aggregate_evaluations(server_round, sound) if sound else None

    def aggregate_updates(self, server_round: int,
                          updates: Sequence["Update"]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise NotImplementedError

    def client_metrics(self, updates: Sequence["Update"]) -> MetricRecord | None:
        """The sound updates' training metrics, averaged by Flower's ``train_metrics_aggr_fn``."""
        return self.train_metrics_aggr_fn([u.reply.content for u in updates], self.weighted_by_key)

    def aggregate_evaluations(self, server_round: int, replies: Sequence[Message]) -> MetricRecord | None:
        return self.evaluate_metrics_aggr_fn([reply.content for reply in replies], self.weighted_by_key)

    def on_replies(self, kind: str, answered: Sequence[Message], failed: Sequence[Message]) -> None:
        """Bookkeeping on every reply before screening (e.g. which nodes now hold what was sent)."""

    def answered(self, server_round: int, replies: Iterable[Message], kind: str) -> list[Message]:
        """The replies that carry content, in partition order; error replies are logged."""
        replies = list(replies)
        failed = [r for r in replies if r.has_error()]
        answered = self.in_partition_order([r for r in replies if not r.has_error()])
        log.info("%s: received %d results and %d failures", f"aggregate_{kind}", len(answered), len(failed))
        for reply in failed:
            log.info("\t> error in the reply of partition %s: %s", self.partition_of(reply), reply.error.reason)
        self.on_replies(kind, answered, failed)
        return answered

    # -- screening: decoded content, finite values, bounded weight and norm -----------------------

    def screen(self, server_round: int, replies: Sequence[Message]) -> list["Update"]:
        """The sound updates among ``replies``; the others are logged, counted in ``rejections``
        and never reach ``aggregate_updates``.

        Each reply must carry the arrays and a finite, positive ``num-examples``; its payload must
        decode (``decode_update``: the strategy's codec and layout) into finite tensors shaped as
        what the client started from. Then the robust bounds (``RobustBounds``): a weight or an
        update norm (||sent - start||_2) above ``ratio`` times the round's lower median is refused.
        """
        candidates, rejected = [], []
        prescreened, self._prescreened = self._prescreened, {}
        for reply in replies:
            outcome = prescreened.get(reply.metadata.message_id)
            if outcome is None:
                outcome = self._screened(server_round, reply)
            if isinstance(outcome, Rejected):
                rejected.append((reply, str(outcome)))
            else:
                candidates.append(outcome)
        bounds = self.robust
        for field, ratio in (("weight", bounds.max_weight_ratio), ("norm", bounds.max_norm_ratio)):
            if ratio is None or not candidates:
                continue
            values = sorted(getattr(u, field) for u in candidates)
            reference = values[(len(values) - 1) // 2]
            if reference <= 0:
                continue
            kept = []
            for update in candidates:
                value = getattr(update, field)
                if value > ratio * reference:
                    rejected.append((update.reply, f"{field} {value:.4g} exceeds {ratio:g} x the round's median "
                                                   f"{reference:.4g} (robust.max_{field}_ratio)"))
                else:
                    kept.append(update)
            candidates = kept
        self.rejections[server_round] = []
        for reply, reason in sorted(rejected, key=lambda r: self.partition_of(r[0])):
            who = self.partition_of(reply)
            self.rejections[server_round].append(f"partition {who}: {reason}")
            log.warning("round %d: rejected the update of partition %s: %s", server_round, who, reason)
        return candidates

    def prescreen(self, server_round: int, reply: Message) -> None:
        """``screen_one`` of a train reply as soon as it arrives, kept for ``screen``: an engine
        that can (the in-process one) calls this on its worker threads while other clients still
        train, so that the serial part of a round is the robust bounds and the aggregation. The
        outcome is the one ``screen`` would compute (the same reply against the same state)."""
        if reply.has_error() or reply.metadata.message_type != MessageType.TRAIN:
            return
        self._prescreened[reply.metadata.message_id] = self._screened(server_round, reply)

    def _screened(self, server_round: int, reply: Message) -> "Update | Rejected":
        """``screen_one``'s update, or the refusal it raised."""
        try:
            return self.screen_one(server_round, reply)
        except Rejected as why:
            return why

    def screen_one(self, server_round: int, reply: Message) -> "Update":
        reason = self.check_metrics(reply, ARRAYS) or truthful_metadata(reply.content[ARRAYS])
        if reason is not None:
            raise Rejected(reason)
        try:
            decoded = self.decode_update(server_round, reply)
        except Rejected:
            raise
        except Exception as exc:  # a payload for another layout, or no valid payload at all
            raise Rejected(f"payload does not decode ({type(exc).__name__}: {exc})") from None
        norm = 0.0
        start = decoded.start
        if start is not None and list(start) != list(decoded.sent):
            raise Rejected("decoded arrays differ from what the client was sent")
        start64 = self._in_float64(server_round, start)
        for name, tensor in decoded.sent.items():
            if start is not None and tensor.shape != start[name].shape:
                raise Rejected(f"{name!r} decodes to shape {list(tensor.shape)}, expected {list(start[name].shape)}")
            if not tensor.is_floating_point():
                continue
            change = tensor.to(torch.float64, copy=True).reshape(-1)
            if start64 is not None:
                change.sub_(start64[name].reshape(-1))
            squares = float(torch.dot(change, change))  # one BLAS pass, not a temporary per step
            if not np.isfinite(squares) and not bool(torch.isfinite(tensor).all()):
                raise Rejected(f"{name!r} has non-finite values")
            norm += squares
        if not np.isfinite(norm):
            raise Rejected("the update's norm overflows")
        weight = float(reply.content[METRICS][self.weighted_by_key])
        return Update(reply, self.partition_of(reply), weight, float(np.sqrt(norm)), decoded.content)

    def _in_float64(self, server_round: int, start: State | None) -> State | None:
        """``start`` in float64, converted once per round while the same dict is screened against
        (every reply of a FedAvg-family round starts from the one broadcast)."""
        if start is None:
            return None
        with self._caches:
            if self._start64 is None or self._start64[:2] != (server_round, id(start)) or self._start64[2] is not start:
                self._start64 = (server_round, id(start), start,
                                 {name: t.to(torch.float64) for name, t in start.items()})
            return self._start64[3]

    def check_metrics(self, reply: Message, arrays: str | None) -> str | None:
        """Why the reply's records are unusable, or None: the arrays (if asked for) and a finite,
        positive ``num-examples``; every other metric finite."""
        content = reply.content
        if (arrays is not None and arrays not in content) or METRICS not in content \
                or self.weighted_by_key not in content[METRICS]:
            return f"reply lacks {ARRAYS!r} or {METRICS!r}[{self.weighted_by_key!r}]"
        for key, value in content[METRICS].items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
                return f"metric {key!r} is {value!r}"
        weight = content[METRICS][self.weighted_by_key]
        if isinstance(weight, list) or weight <= 0:
            return f"{self.weighted_by_key} is {weight!r}"
        return None

    def decode_update(self, server_round: int, reply: Message) -> "Decoded":
        """The reply's payload through the up codec against the broadcast weights (FedAvg and
        family); strategies with another payload family decode their own. Raise ``Rejected`` (or
        let the codec raise) for a payload that does not fit."""
        if self.reference is None:
            raise Rejected("no global model was sent this round")
        with self._caches:
            if self._layout_for is not self.reference:  # one layout per broadcast
                self._layout, self._layout_for = PayloadLayout.of(self.up_codec, self.reference), self.reference
            layout = self._layout
        reason = layout.check(reply.content[ARRAYS])
        if reason is not None:
            raise Rejected(reason)
        return Decoded(self.up_codec.decode(reply.content[ARRAYS], self.reference), self.reference)

    def partition_of(self, reply: Message) -> int:
        node = reply.metadata.src_node_id
        return self._directory.partition_of_node.get(node, node) if self._directory else node

    def decode_replies(self, updates: Sequence["Update"]) -> tuple[Sequence[State], list[float]]:
        """The updates' states, decoded again one at a time as they are read (``DecodedStates``),
        and their aggregation weights."""
        return DecodedStates(self.up_codec, self.reference, [u.reply for u in updates]), [u.weight for u in updates]

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])

    def rejected(self, server_round: int) -> list[str]:
        return self.rejections.get(server_round, [])


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
        return None


def truthful_metadata(record: ArrayRecord) -> str | None:
    """Why an array's bytes contradict its metadata (shape, dtype), or None."""
    for name, array in record.items():
        try:
            values = array_values(array, copy=False)
        except Exception as exc:
            return f"{name!r} does not decode ({type(exc).__name__}: {exc})"
        if list(values.shape) != list(array.shape) or values.dtype != np.dtype(array.dtype):
            return (f"{name!r}: its bytes hold shape {list(values.shape)} ({values.dtype}), "
                    f"its metadata says {list(array.shape)} ({array.dtype})")
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
                acc[name] = torch.zeros(tensor.shape, dtype=torch.float64, device=tensor.device)
                dtypes[name] = tensor.dtype
            acc[name].add_(tensor.to(torch.float64), alpha=weight / total)
    return {name: a.round().to(dtypes[name]) if not dtypes[name].is_floating_point else a.to(dtypes[name])
            for name, a in acc.items()}
