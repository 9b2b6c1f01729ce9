"""FedDST (Bibikar et al., "Federated Dynamic Sparse Training: Computing Less, Communicating Less,
Yet Learning Better", AAAI 2022), Algorithm 1, server side; the client side is the ``masked``
trainer (``clients/feddst_trainer.py``).

One global sparse model (weights w, mask m) at target sparsity S. Per round t = 1..T:

    init (t = 1):  per-layer budgets K_l from the ERK allocation below; the first global mask keeps
                   each layer's K_l initial weights of largest magnitude (as the authors' code
                   prunes its initial model) and w <- w * m
    configure:     sample clients with the run's seeded sampler; round t readjusts masks iff
                       t mod R_adj == 0,  t <= R_end  and  alpha_t > 0,
                   alpha_t = alpha/2 (1 + cos(pi t / R_end)) (``alpha_schedule: cosine``, the paper's
                   annealing) or alpha (``constant``). Each client receives the values of w at m, and
                   the bitmap of m only when it does not already hold this version of m (a
                   per-client payload; versions are confirmed by the client's reply)
    train:         the client trains E epochs with off-mask weights held at 0; on a readjustment
                   round it then prunes n_l = ceil(alpha_t K_l) active weights of smallest |w| and
                   grows as many inactive ones of largest dense-gradient |g| (at 0), and uploads
                   values + mask; on other rounds values only (its mask is the global one)
    aggregate:     for every masked coordinate i, with client masks m_k, weights w_k, samples n_k,
                       w_i = sum_k n_k m_k,i w_k,i / sum_k n_k m_k,i      (0 where no client holds i)
                   every unmasked tensor (biases, normalization, layers ERK leaves dense):
                       w = sum_k n_k w_k / sum_k n_k
    server update: re-prune each layer to its budget by magnitude: the new m_l keeps the K_l
                   coordinates of largest |w_i| (ties: larger sum_k n_k m_k,i, then lower flat index,
                   so a coordinate a client grew outranks one nobody holds), and w <- w * m.
                   Without readjustment every client returns the global mask, so m cannot change;
                   the mask version increments whenever m changes.

ERK allocation (Evci et al., "Rigging the Lottery", ICML 2020, Sec. 3, as in RigL's code;
``fl.sparsity.erk_budgets``): conv and linear weights, the first conv and the classifier included,
share the budget (1 - S) of their entries, each in proportion to (n_1 + ... + n_d) / prod n_j,
clamped to dense; biases and normalization parameters stay dense. For ``cnn_small`` at S = 0.8
this leaves the first conv (864 weights) and the classifier (2,200) dense and makes the two other
convs and the hidden linear layer 77-89% sparse. Dense tensors carry no mask (no bitmap bits).

The mask of every layer holds exactly K_l coordinates after every server step; their values are
nonzero except for coordinates a client has just grown (they start at 0 and train next round).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clients.feddst_trainer import MASK_VERSION, MASKED, READJUST_ALPHA
from clients.trainer import TRAINER
from fl.errors import ConfigError
from fl.message_keys import ARRAYS, CONFIG, METRICS
from fl.payload import Masks, State, has_bitmap
from fl.sparsity import apply_mask, erk_budgets, magnitude_masks, prunable_shapes, top_k_mask
from strategies.base import Decoded, Rejected, Update, weighted_mean
from strategies.fedavg import FedAvg

ALPHA_SCHEDULES = ("cosine", "constant")


class FedDST(FedAvg):
    payload_family = "bitmap"  # values at the mask + the mask as a bitmap: codec.up=fp16 is its fp16 codec (fl.payload.family)

    def __init__(self, *, sparsity: float = 0.8, alpha: float = 0.01, r_adj: int = 15, r_end: int | None = None,
                 num_rounds: int | None = None, alpha_schedule: str = "cosine",
                 dense_layers: Sequence[str] = (), **kwargs: Any):
        super().__init__(**kwargs)
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError("strategy.sparsity", f"must be in [0, 1), got {sparsity}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError("strategy.alpha", f"must be in [0, 1], got {alpha}")
        if int(r_adj) < 1:
            raise ConfigError("strategy.r_adj", f"must be >= 1, got {r_adj}")
        if alpha_schedule not in ALPHA_SCHEDULES:
            raise ConfigError("strategy.alpha_schedule", f"must be one of {', '.join(ALPHA_SCHEDULES)}, got {alpha_schedule!r}")
        if r_end is None:
            if num_rounds is None:
                raise ConfigError("strategy.r_end", "is required when strategy.num_rounds is not given (R_end = rounds/2)")
            r_end = int(num_rounds) // 2
        self.sparsity, self.alpha, self.r_adj, self.r_end = float(sparsity), float(alpha), int(r_adj), int(r_end)
        self.alpha_schedule = alpha_schedule
        self.dense_layers = tuple(dense_layers)
        # Server state (state_dict): budgets K_l of every prunable tensor, the global mask of the
        # sparse ones, its version, and the mask version each partition last confirmed holding.
        self.budgets: dict[str, int] = {}
        self.mask: Masks | None = None
        self.mask_version = 0
        self.held: dict[int, int] = {}
        self._round_info: dict[str, float] = {}

    # -- configure ---------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        state = arrays.to_torch_state_dict()
        if self.mask is None:
            self.initialize(state)
        self.reference = apply_mask(state, self.mask)
        nodes = self.sample(grid, server_round, "train", self.fraction_train, self.min_train_nodes)
        alpha_t = self.readjust_alpha(server_round)
        config = self.stamp(config, server_round, down=self.down_codec.name, up=self.up_codec.name)
        config[TRAINER] = MASKED
        config[MASK_VERSION] = self.mask_version
        config[READJUST_ALPHA] = alpha_t
        contents: dict[bool, RecordDict] = {}  # with / without the bitmap, each built once per round

        def content(with_bitmap: bool) -> RecordDict:
            if with_bitmap not in contents:
                record = self.down_codec.encode_masked(self.reference, self.mask, with_bitmap=with_bitmap)
                contents[with_bitmap] = RecordDict({ARRAYS: record, CONFIG: config})
            return contents[with_bitmap]

        partition_of = self._partition_of()
        messages = [Message(content(self.held.get(partition_of.get(node, node)) != self.mask_version), node,
                            MessageType.TRAIN) for node in nodes]
        bitmaps = sum(1 for m in messages if has_bitmap(m.content[ARRAYS]))
        self._round_info = {"feddst/readjust_alpha": alpha_t, "feddst/bitmaps_sent": bitmaps}
        return messages

    def readjust_alpha(self, server_round: int) -> float:
        """alpha_t on a readjustment round (t mod R_adj == 0 and t <= R_end), else 0."""
        if server_round % self.r_adj != 0 or server_round > self.r_end:
            return 0.0
        if self.alpha_schedule == "constant":
            return self.alpha
        return self.alpha / 2 * (1 + math.cos(math.pi * server_round / self.r_end))

    def initialize(self, state: Mapping[str, torch.Tensor]) -> None:
        """ERK budgets and the first mask: each layer's K_l largest-magnitude initial weights."""
        self.budgets = erk_budgets(prunable_shapes(state), self.sparsity, self.dense_layers)
        self.mask = magnitude_masks(state, self.budgets)
        self.mask_version = 1

    # -- aggregate ---------------------------------------------------------------------------

    def on_replies(self, kind: str, answered: Sequence[Message], failed: Sequence[Message]) -> None:
        if kind != MessageType.TRAIN:
            return
        for reply in failed:  # its node may have lost its mask: send the bitmap next time
            self.held.pop(self.partition_of(reply), None)

    def aggregate_updates(self, server_round: int,
                          updates: Sequence[Update]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        states = [u.content[0] for u in updates]
        masks = [u.content[1] for u in updates]
        weights = [u.weight for u in updates]
        for update in updates:
            self.held[update.partition] = int(update.reply.content[METRICS][MASK_VERSION])
        new_state, new_mask = self.server_update(server_round, states, masks, weights)
        changed = sum(int((new_mask[name] ^ self.mask[name]).sum()) for name in self.mask)
        if changed:
            self.mask_version += 1
        self.mask = new_mask
        metrics = self.client_metrics(updates)
        masked = sum(m.numel() for m in self.mask.values())
        for key, value in {**self._round_info, "feddst/global_mask_changed": changed,
                           "feddst/mask_version": self.mask_version,
                           "feddst/density": sum(int(m.sum()) for m in self.mask.values()) / max(masked, 1)}.items():
            metrics[key] = value
        return ArrayRecord(new_state), metrics

    def decode_update(self, server_round: int, reply: Message) -> Decoded:
        """A sound FedDST update decodes against the global mask (or carries its own bitmap),
        reports the mask version it trained on and keeps every layer at its budget."""
        if MASK_VERSION not in reply.content[METRICS]:
            raise Rejected(f"reply lacks {METRICS!r}[{MASK_VERSION!r}]")
        try:
            state, masks = self.up_codec.decode_masked(reply.content[ARRAYS], self.reference, self.mask)
        except (KeyError, ValueError, TypeError) as exc:
            raise Rejected(f"sparse payload does not decode ({exc})") from None
        for name, mask in masks.items():
            if name not in self.mask or int(mask.sum()) != self.budgets[name]:
                raise Rejected(f"mask of {name!r} holds {int(mask.sum())} entries, not its budget "
                               f"{self.budgets.get(name)}")
        return Decoded(state, self.reference, (state, masks))

    def server_update(self, server_round: int, states: Sequence[State], masks: Sequence[Masks],
                      weights: Sequence[float]) -> tuple[State, Masks]:
        """Holder-weighted mean of masked tensors, sample-weighted mean of the rest, re-prune to K_l."""
        unmasked = [name for name in states[0] if name not in self.mask]
        out = weighted_mean([{name: s[name] for name in unmasked} for s in states], weights) if unmasked else {}
        new_mask: Masks = {}
        for name in self.mask:
            value, holders = holder_weighted_mean([s[name] for s in states], [m[name] for m in masks], weights)
            new_mask[name] = top_k_mask(value.abs(), holders, self.budgets[name])
            out[name] = (value * new_mask[name]).to(states[0][name].dtype)
        return {name: out[name] for name in states[0]}, new_mask

    # -- federated evaluation: the sparse model, with its bitmap --------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.sample(grid, server_round, "evaluate", self.fraction_evaluate, self.min_evaluate_nodes)
        state = arrays.to_torch_state_dict()
        record = self.down_codec.encode_masked(state, self.mask) if self.mask else self.down_codec.encode(state)
        content = RecordDict({ARRAYS: record, CONFIG: self.stamp(config, server_round, down=self.down_codec.name)})
        return [Message(content, node, MessageType.EVALUATE) for node in nodes]

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "budgets": dict(self.budgets), "mask_version": self.mask_version,
                "mask": None if self.mask is None else {k: v.clone() for k, v in self.mask.items()},
                "held": dict(self.held)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.budgets = {k: int(v) for k, v in state["budgets"].items()}
        self.mask_version = int(state["mask_version"])
        self.mask = None if state["mask"] is None else {k: v.to(torch.bool).clone() for k, v in state["mask"].items()}
        self.held = {int(k): int(v) for k, v in state["held"].items()}

    def _partition_of(self) -> dict[int, int]:
        return self._directory.partition_of_node if self._directory else {}


# -- helpers ------------------------------------------------------------------------------------

def holder_weighted_mean(values: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                         weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_k n_k m_k w_k / sum_k n_k m_k, 0 where no client holds a coordinate; sum_k n_k m_k)."""
    num = torch.zeros(values[0].shape, dtype=torch.float64)
    den = torch.zeros(values[0].shape, dtype=torch.float64)
    for value, mask, weight in zip(values, masks, weights):
        held = mask.to(torch.float64) * weight
        num.add_(value.to(torch.float64) * held)
        den.add_(held)
    mean = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(num))
    return mean.to(torch.float32), den
