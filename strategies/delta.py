"""DELTA-factorized federated learning (Wang and Nirjon, "Explaining the Difference Between Edge
Models and High-Accuracy Base Models for Vision Tasks" (XDELTA), its federated use case), with
HeteroFL-style nested width tiers (Diao et al., ICLR 2021).

    server state: the fused model w = (E, DELTA, base classifier C_B) (``model=delta``: built
                  centrally by fl.delta.construct from a pretrained pair); E and C_B frozen; the
                  DELTA at the largest width, every sliced dimension ordered by importance so that
                  the width-s DELTA is the prefix block of every tensor
                  (``fl.delta.network.tier_keep``); a fixed tier s_k per client (``equal``: a seeded
                  equal split; ``profiles``: the faster the device profile, the wider the tier)
    configure:    sample clients with the run's seeded sampler; send client k the DELTA's
                  width-s_k prefix blocks, plus E and C_B when k does not hold their current
                  version yet (channel-slice codec, ``fl.delta.slices``)
    train:        (clients.delta_trainer) E epochs of SGD on the width-s_k fused model with E and
                  C_B frozen: CE(C_B(fused), y) + lambda_FNC * L_FNC + lambda_SR * group lasso;
                  every ``edge_every`` rounds E trains too; upload the width-s_k blocks (+ E)
    aggregate:    per DELTA coordinate i, with H_i the participants whose slice covers i and n_k
                  client k's training-split size:
                      w_i <- sum_{k in H_i} n_k w_k,i / sum_{k in H_i} n_k   if H_i is not empty
                      w_i unchanged                                           otherwise
                  (``strategies.hermes.average_held``); on edge rounds E <- the sample-weighted
                  mean of the uploaded E's and its version moves on; C_B never changes.
    evaluate:     the run evaluates the full-width fused model centrally every round; this
                  strategy adds the global model cut to every tier width on the central test set
                  (``train/<tier>/global_accuracy``) and, with ``fraction_evaluate`` > 0, each
                  sampled client's tier model on its held-out split, averaged per tier
                  (``fed_eval/<tier>/client_accuracy``); both every ``tier_eval_every`` rounds,
                  the tier accuracies on the run's compute device (``fl.compute``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clients.delta_trainer import NAME, TIER_WIDTH
from clients.trainer import TRAINER
from fl.delta.network import FusedDelta, fuse, tier_model
from fl.delta.slices import (ARCH, DELTA_TIER, FNC_WEIGHT, FROZEN_VERSION, SR_WEIGHT, TRAIN_EDGE, VAL_FRACTION, WIDTH,
                             WITH_FROZEN, blocks_for, download_layout, is_edge, is_trainable, same_keep,
                             upload_layout, upload_sizes, width_key)
from fl.errors import ConfigError
from fl.message_keys import ARRAYS, CONFIG, METRICS
from fl.payload import State
from strategies.base import Decoded, FederatedStrategy, Rejected, Update, weighted_mean
from strategies.hermes import HOLDERS, Upload, average_held

DEFAULT_TIERS = (1.0, 1 / math.sqrt(2), 0.5, 1 / (2 * math.sqrt(2)))
ASSIGNMENTS = ("equal", "profiles")
_TIER_STREAM = 0x7E12  # seed word of the equal tier assignment
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeltaUpload:
    partition: int
    upload: Upload  # the DELTA blocks on the client's slice (for average_held)
    edge: State | None  # E, on edge rounds


class DeltaFactorized(FederatedStrategy):
    payload_family = "slice"  # kept channels + channel bitmap: codec.up=fp16 is its fp16 codec (fl.payload.family)

    def __init__(self, *, tiers: Sequence[float] = DEFAULT_TIERS, tier_assignment: str = "equal",
                 device: Mapping[str, Any] | None = None, edge_every: int = 0, fnc: float = 0.05, sr: float = 1e-4,
                 val_fraction: float = 0.2, tier_eval_every: int = 5, build_model: Callable[[], Any] | None = None,
                 test_set: Any = None, compute: torch.device | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.tiers = check_tiers(tiers)
        if tier_assignment not in ASSIGNMENTS:
            raise ConfigError("strategy.tier_assignment", f"unknown {tier_assignment!r}; allowed: {', '.join(ASSIGNMENTS)}")
        if tier_assignment == "profiles" and not (device or {}).get("profiles"):
            raise ConfigError("strategy.tier_assignment", "profiles needs device profiles (device=edge_mix)")
        for key, value in (("edge_every", edge_every), ("tier_eval_every", tier_eval_every)):
            if int(value) < 0:
                raise ConfigError(f"strategy.{key}", f"must be >= 0, got {value}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError("strategy.val_fraction", f"must be in [0, 1), got {val_fraction}")
        self.tier_assignment, self.device = tier_assignment, dict(device or {})
        self.edge_every, self.tier_eval_every = int(edge_every), int(tier_eval_every)
        self.fnc, self.sr, self.val_fraction = float(fnc), float(sr), float(val_fraction)
        self.test_set = test_set
        self.compute = torch.device("cpu") if compute is None else torch.device(compute)
        template = build_model() if build_model is not None else None
        if template is not None and not isinstance(template, FusedDelta):
            raise ConfigError("model", f"strategy=delta trains a fused edge+DELTA model; use model=delta, "
                                       f"not a {type(template).__name__}")
        self.template: FusedDelta | None = None if template is None else template.to(self.compute)
        self.global_state: State | None = None
        self.frozen_version = 0  # bumps when E changes (edge rounds)
        self.delivered: dict[int, int] = {}  # partition -> version of E + C_B it holds
        self._sent_version: dict[int, int] = {}  # partition -> version sent this round
        self._test_edge: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._tier_of: list[int] | None = None  # partition -> tier index (a function of the config)
        self._sizes_logged = False

    # -- configure: each sampled client gets its tier's DELTA slice (+ E and C_B once) --------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        self.setup(arrays)
        nodes = self.sample(grid, server_round, "train", self.fraction_train, self.min_train_nodes)
        edge_round = self.is_edge_round(server_round)
        records: dict = {}
        return [self.message(node, config, server_round, MessageType.TRAIN, edge_round, records) for node in nodes]

    def message(self, node: int, config: ConfigRecord, server_round: int, kind: str, edge_round: bool,
                records: dict[tuple[float, bool], ArrayRecord]) -> Message:
        """``records``: the round's downloads so far, one per (width, with E and C_B), shared by the
        messages that carry it as FedAvg's broadcast is (the bytes are each message's)."""
        partition = self.partition(node)
        width = self.width_of(partition)
        with_frozen = self.delivered.get(partition) != self.frozen_version
        self._sent_version[partition] = self.frozen_version
        if (width, with_frozen) not in records:
            reference, keep = download_layout(self.global_state, self.arch_json, width, with_frozen)
            records[width, with_frozen] = self.down_codec.encode_slices(blocks_for(self.global_state, reference, keep),
                                                                        keep)
        record = records[width, with_frozen]
        client_config = ConfigRecord({
            **config, TRAINER: NAME, ARCH: self.arch_json, WIDTH: width, WITH_FROZEN: with_frozen,
            FROZEN_VERSION: self.frozen_version, TRAIN_EDGE: edge_round and kind == MessageType.TRAIN,
            FNC_WEIGHT: self.fnc, SR_WEIGHT: self.sr, VAL_FRACTION: self.val_fraction})
        up = self.up_codec.name if kind == MessageType.TRAIN else None
        return Message(RecordDict({ARRAYS: record, CONFIG: self.stamp(client_config, server_round,
                                                                     down=self.down_codec.name, up=up)}),
                       node, kind)

    # -- aggregate: every DELTA coordinate over the clients whose slice covers it --------------

    def on_replies(self, kind: str, answered: Sequence[Message], failed: Sequence[Message]) -> None:
        self.confirm_delivery(answered)

    def aggregate_updates(self, server_round: int,
                          updates: Sequence[Update]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        uploads = [u.content for u in updates]
        self.global_state = self.server_update(server_round, uploads)
        metrics = self.client_metrics(updates)
        metrics.pop(TIER_WIDTH, None)
        for width in self.tiers:
            metrics[f"{width_key(width)}/clients"] = sum(self.width_of(u.partition) == width for u in uploads)
        if self.tier_eval_every and self.test_set is not None and server_round % self.tier_eval_every == 0:
            for width, acc in self.tier_accuracies().items():
                metrics[f"{width_key(width)}/global_accuracy"] = acc
        return ArrayRecord(self.global_state), metrics

    def decode_update(self, server_round: int, reply: Message) -> Decoded:
        """Client k's tier slice of the DELTA (and of E in an edge round), in its tier's layout."""
        partition = self.partition(reply.metadata.src_node_id)
        width = self.width_of(partition)
        edge_round = self.is_edge_round(server_round)
        reference, keep = upload_layout(self.global_state, self.arch_json, width, edge_round)
        try:
            blocks, got = self.up_codec.decode_slices(reply.content[ARRAYS], reference)
        except Exception as exc:  # a payload for another layout
            raise Rejected(f"does not decode as a width-{width:.3f} slice ({type(exc).__name__}: {exc})") from None
        if not same_keep(got, keep):
            raise Rejected(f"its slice is not the width-{width:.3f} tier's")
        delta_blocks = {n: t for n, t in blocks.items() if is_trainable(n)}
        delta_keep = {n: keep[n] for n in delta_blocks}
        edge = {n: t for n, t in blocks.items() if is_edge(n)} if edge_round else None
        weight = float(reply.content[METRICS][self.weighted_by_key])
        upload = DeltaUpload(partition, Upload(partition, delta_blocks, delta_keep, weight), edge)
        return Decoded(blocks, blocks_for(self.global_state, reference, keep), upload)

    def server_update(self, server_round: int, uploads: Sequence[DeltaUpload]) -> State:
        trainable = {n: t for n, t in self.global_state.items() if is_trainable(n)}
        new = {**self.global_state, **average_held(trainable, [u.upload for u in uploads], HOLDERS["count"])}
        if self.is_edge_round(server_round) and uploads:
            new.update(weighted_mean([u.edge for u in uploads], [u.upload.weight for u in uploads]))
            self.frozen_version += 1
        return new

    # -- evaluate: each tier's global model centrally; each client's tier model on its data --

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0 or not self.tier_eval_every or server_round % self.tier_eval_every:
            return []
        self.setup(arrays)
        nodes = self.sample(grid, server_round, "evaluate", self.fraction_evaluate, self.min_evaluate_nodes)
        records: dict = {}
        return [self.message(node, config, server_round, MessageType.EVALUATE, False, records) for node in nodes]

    def aggregate_evaluations(self, server_round: int, ordered: Sequence[Message]) -> MetricRecord | None:
        metrics = MetricRecord()
        for width in self.tiers:
            tier = [r.content[METRICS] for r in ordered if self.width_of(self.partition(r.metadata.src_node_id)) == width]
            n = sum(float(m[self.weighted_by_key]) for m in tier)
            if n > 0:
                metrics[f"{width_key(width)}/client_accuracy"] = sum(
                    float(m["accuracy"]) * float(m[self.weighted_by_key]) for m in tier) / n
        n = sum(float(r.content[METRICS][self.weighted_by_key]) for r in ordered)
        if n > 0:
            metrics["client_accuracy"] = sum(float(r.content[METRICS]["accuracy"]) *
                                             float(r.content[METRICS][self.weighted_by_key]) for r in ordered) / n
        return metrics

    @torch.no_grad()
    def tier_accuracies(self) -> dict[float, float]:
        """The global fused model cut to every tier width, on the central test set."""
        model = self.template
        model.load_state_dict(self.global_state)
        model.eval()
        x, y = (t.to(self.compute) for t in self.test_set.get(np.arange(len(self.test_set))))
        if self._test_edge is None or self._test_edge[0] != self.frozen_version:
            self._test_edge = (self.frozen_version, model.edge_outputs(x))
        edge = self._test_edge[1]
        out = {}
        for width in self.tiers:
            tier = tier_model(model, width).eval()
            logits = tier.classifier(fuse(tier, tier.delta(x), *edge).fused)
            out[width] = float((logits.argmax(1) == y).float().mean())
        return out

    # -- helpers -------------------------------------------------------------------------------

    def setup(self, arrays: ArrayRecord) -> None:
        self.global_state = arrays.to_torch_state_dict()
        self.reference = self.global_state
        if self.template is None:
            raise ConfigError("model", "strategy=delta needs the run's fused model (model=delta); "
                                       "construct DeltaFactorized with build_model")
        if set(self.global_state) != set(self.template.state_dict()):
            raise ConfigError("model", "the global arrays are not the fused model's state (use model=delta)")
        if not self._sizes_logged:
            self._sizes_logged = True
            sizes = upload_sizes(self.global_state, self.arch_json, self.tiers, self.up_codec)
            full = sizes[self.tiers[0]]
            for width, (params, up) in sizes.items():
                log.info("DELTA tier %s: %s parameters (%.1f%%), %s bytes up per client and round (%.1f%%)",
                         width_key(width), f"{params:,}", 100 * params / full[0], f"{up:,}", 100 * up / full[1])

    @property
    def arch_json(self) -> str:
        return self.template.arch.to_json()

    def is_edge_round(self, server_round: int) -> bool:
        return self.edge_every > 0 and server_round % self.edge_every == 0

    def confirm_delivery(self, replies: Sequence[Message]) -> None:
        """A node that replied holds the version of E + C_B it was sent this round."""
        for reply in replies:
            partition = self.partition(reply.metadata.src_node_id)
            if partition in self._sent_version:
                self.delivered[partition] = self._sent_version[partition]

    def partition(self, node: int) -> int:
        return self._directory.partition_of_node[node] if self._directory else node

    def width_of(self, partition: int) -> float:
        return self.tiers[self.tier_index(partition)]

    def tier_index(self, partition: int) -> int:
        """The partition's tier: the one its device reported (a deployment; ``fl.deploy.device``),
        else the run's assignment (``assign_tiers``)."""
        reported = self._directory.reported.get(partition, {}).get(DELTA_TIER) if self._directory else None
        if reported is not None:
            if not 0 <= reported < len(self.tiers):
                raise ValueError(f"partition {partition} reported tier {reported:g}; this run has {len(self.tiers)} tiers")
            return int(reported)
        if self._tier_of is None:
            self._tier_of = assign_tiers(self.min_available_nodes, len(self.tiers), self.tier_assignment,
                                         self.device, self.seed)
        if not 0 <= partition < len(self._tier_of):
            raise ValueError(f"partition {partition} outside the federation of {len(self._tier_of)}")
        return self._tier_of[partition]

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "frozen_version": self.frozen_version, "delivered": dict(self.delivered)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.frozen_version = int(state["frozen_version"])
        self.delivered = {int(p): int(v) for p, v in state["delivered"].items()}


def assign_tiers(num_partitions: int, num_tiers: int, how: str, device: Mapping[str, Any], seed: int) -> list[int]:
    """Each partition's tier index (0 = the widest).

    equal:    a seeded permutation of the partitions cut into ``num_tiers`` equal runs (25 each of 100)
    profiles: the partition's device profile as the run's clock assigns it (``fl.clock``, same seed);
              profiles ranked by speed (``macs_per_s``), fastest first, spread evenly over the tiers
    """
    n = max(num_partitions, 1)
    if how == "equal":
        order = np.random.default_rng([seed, _TIER_STREAM]).permutation(n)
        out = [0] * n
        for rank, partition in enumerate(order):
            out[int(partition)] = min(rank * num_tiers // n, num_tiers - 1)
        return out
    from fl.clock import clock_spec

    clock = clock_spec(dict(device), 0, seed)
    speeds = sorted({p.macs_per_s for p in clock.profiles}, reverse=True)
    return [min(speeds.index(p.macs_per_s) * num_tiers // len(speeds), num_tiers - 1) for p in clock.assign(n)]


def check_tiers(tiers: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(t) for t in tiers)
    if not out or any(not 0.0 < t <= 1.0 for t in out) or list(out) != sorted(out, reverse=True) \
            or len(set(out)) != len(out) or out[0] != 1.0:
        raise ConfigError("strategy.tiers", f"must be distinct widths in (0, 1], widest first and starting at 1.0, "
                                            f"got {list(tiers)}")
    return out
