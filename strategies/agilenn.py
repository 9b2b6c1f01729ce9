"""AgileNN split training, federated (Huang and Gao, "Real-time Neural Network Inference on
Extremely Weak Devices: Agile Offloading with Explainable AI", MobiCom 2022), on FedAvg.

    rounds 1..P   pretrain (section 4.1): clients train the extractor and the reference with CE;
                  FedAvg. On round P the replies carry Algorithm 1's per-channel top-k counts and
                  quantiles of the feature values; the server sums the counts, permutes the
                  extractor's last filters (``plugins.agilenn.selection``), starts the centroids
                  at the mean quantiles and freezes the reference from then on.
    rounds > P    AgileNN (sections 4-5), with ``remote``:
        fedavg    clients train the whole split network (extractor, local head, w, centroids and
                  the remote head) with lambda CE + (1 - lambda)(skewness + disorder); FedAvg of all.
        split     split learning: per batch, a client sends its coded remote features, local
                  logits, labels and w; the server runs the remote head, takes an SGD step on it
                  (clients in partition order) and returns the gradients of lambda CE on the
                  features, the local logits and w; the client backpropagates them together with
                  its own (1 - lambda)(skewness + disorder). After its last batch a client uploads
                  the device part, which the server averages (FedAvg); the remote head never
                  leaves the server. Every exchange is a Flower message through the run's Grid,
                  so its bytes are metered like every other (``fl.payload.payload_bytes``).

The split-learning exchanges of a round run inside ``configure_train`` (the round's last
messages, the final gradients, are what it returns to Flower's loop, whose replies are the
device uploads ``aggregate_train`` averages). The server's network (the remote head it trains,
the channel selection, central evaluation) lives on the run's compute device (``fl.compute``);
what it aggregates and sends is on the CPU.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clients.trainer import TRAINER
from fl.compute import to_cpu
from fl.errors import ConfigError
from fl.local_training import ClientData
from fl.message_keys import ARRAYS, CONFIG, LR, METRICS, MOMENTUM, WEIGHT_DECAY
from fl.payload import State, decode_features, decode_tensors, encode_tensors
from plugins.agilenn.network import AgileNet
from plugins.agilenn.protocol import (AGILE, ALPHA_W, CENTROID_PREFIX, COUNT_PREFIX, GRAD_ALPHA, GRAD_FEATURES,
                                    GRAD_LOCAL, GRAD_VALUES, LABELS, LAST, LAMBDA, LOCAL, NAME, PHASE, PRETRAIN,
                                    PROBE, RHO, SELECT, SPLIT, STEP)
from plugins.agilenn.selection import permute_channels, ranking
from plugins.agilenn.training import measure, reference_accuracy, AgileHyper, AgileLoss
from strategies.base import Update
from strategies.fedavg import FedAvg

REMOTE_MODES = ("fedavg", "split")


class AgileNN(FedAvg):
    def __init__(self, *, remote: str = "fedavg", pretrain_rounds: int = 2, rho: float = 0.8, lam: float = 0.8,
                 probe_batches: int = 1, grad_values: str = "fp32", build_model: Callable[[], Any] | None = None,
                 compute: torch.device | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if remote not in REMOTE_MODES:
            raise ConfigError("strategy.remote", f"unknown {remote!r}; allowed: {', '.join(REMOTE_MODES)}")
        if int(pretrain_rounds) < 1:
            raise ConfigError("strategy.pretrain_rounds", f"must be >= 1 (the reference is pretrained), got {pretrain_rounds}")
        if not 0 <= rho <= 1 or not 0 <= lam <= 1:
            raise ConfigError("strategy.rho", f"rho and lam must lie in [0, 1], got {rho}, {lam}")
        if grad_values not in ("fp32", "fp16"):
            raise ConfigError("strategy.grad_values", f"must be fp32 or fp16, got {grad_values!r}")
        self.remote, self.pretrain_rounds = remote, int(pretrain_rounds)
        self.hyper = AgileHyper(rho=float(rho), lam=float(lam))
        self.probe_batches, self.grad_values = int(probe_batches), grad_values
        template = build_model() if build_model is not None else None
        if template is not None and not (isinstance(template, AgileNet) and template.split):
            raise ConfigError("model", f"strategy=agilenn trains the split network; use model=agilenn (plugins=[agilenn]), "
                                       f"not a {type(template).__name__}")
        self.compute = torch.device("cpu") if compute is None else torch.device(compute)
        self.template: AgileNet | None = None if template is None else template.to(self.compute)
        self._server_remote: AgileNet | None = None  # split mode: the remote head the server trains
        self._global: State | None = None

    def phase(self, server_round: int) -> str:
        if server_round <= self.pretrain_rounds:
            return PRETRAIN
        return SPLIT if self.remote == "split" else AGILE

    # -- configure ---------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        phase = self.phase(server_round)
        config = ConfigRecord({**config, TRAINER: NAME, PHASE: phase, RHO: self.hyper.rho, LAMBDA: self.hyper.lam,
                               SELECT: server_round == self.pretrain_rounds, PROBE: self.probe_batches,
                               GRAD_VALUES: self.grad_values})
        if phase != SPLIT:
            return super().configure_train(server_round, arrays, config, grid)
        return self.split_round(server_round, arrays, config, grid)

    # -- aggregate ---------------------------------------------------------------------------

    def aggregate_updates(self, server_round: int,
                          updates: Sequence[Update]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        phase = self.phase(server_round)
        self._last_round = server_round
        arrays, metrics = super().aggregate_updates(server_round, updates)
        if arrays is None:
            return arrays, metrics
        state = arrays.to_torch_state_dict()
        if phase == SPLIT:  # the averaged device part + the remote head the server trained
            state = {**self._global, **self.remote_state(), **state}
        if phase == PRETRAIN and server_round == self.pretrain_rounds:
            state, selection = self.select_channels(state, [u.reply for u in updates])
            metrics = MetricRecord({**(metrics or {}), **selection})
        if metrics is not None:
            for key in [k for k in metrics if k.startswith((COUNT_PREFIX, CENTROID_PREFIX))] + [LAST, "agilenn.done"]:
                metrics.pop(key, None)
        return ArrayRecord(state), metrics

    def select_channels(self, state: State, replies: Sequence[Message]) -> tuple[State, dict[str, float]]:
        """Algorithm 1 over the clients' summed counts; centroids at the mean feature quantiles."""
        model = self.template
        model.load_state_dict(state)
        counts = torch.zeros(model.channels, dtype=torch.float64)
        quantiles, weights = [], []
        for reply in replies:
            m = reply.content[METRICS]
            if f"{COUNT_PREFIX}0" not in m:
                continue
            counts += torch.tensor([float(m[f"{COUNT_PREFIX}{c}"]) for c in range(model.channels)], dtype=torch.float64)
            quantiles.append([float(m[f"{CENTROID_PREFIX}{j}"]) for j in range(model.quantizer.levels)])
            weights.append(float(m[self.weighted_by_key]))
        order = ranking(counts)
        permute_channels(model, order)
        if quantiles:
            mean = np.average(np.array(quantiles), axis=0, weights=weights)
            with torch.no_grad():
                model.quantizer.centroids.copy_(torch.from_numpy(np.sort(mean)).float())
        top = counts[order[:model.k]].sum() / max(float(counts.sum()), 1.0)
        return {k: v.clone() for k, v in to_cpu(model.state_dict()).items()}, {"selection_topk_count_share": float(top)}

    # -- split learning -------------------------------------------------------------------------

    def split_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Run the round's split-learning exchanges; return the final gradient messages."""
        self._global = arrays.to_torch_state_dict()
        model = self.template
        model.load_state_dict(self._global)
        device_names = model.device_state_names()
        device = {n: self._global[n] for n in device_names}
        self.reference = device  # what clients upload at the end (validated against it)
        server = model.remote
        server.train()
        optimizer = torch.optim.SGD(server.parameters(), lr=float(config[LR]), momentum=float(config.get(MOMENTUM, 0.0)),
                                    weight_decay=float(config.get(WEIGHT_DECAY, 0.0)))
        nodes = self.sample(grid, server_round, "train", self.fraction_train, self.min_train_nodes)
        first = RecordDict({ARRAYS: self.down_codec.encode(device),
                            CONFIG: self.stamp(ConfigRecord({**config, STEP: 0}), server_round,
                                               down=self.down_codec.name, up=self.up_codec.name)})
        messages = [Message(first, node, MessageType.TRAIN) for node in nodes]
        final: list[Message] = []
        step = 0
        while messages:
            replies = self.in_partition_order(r for r in grid.send_and_receive(messages) if not r.has_error())
            step += 1
            messages = []
            for reply in replies:
                grads = self.server_step(model, optimizer, reply.content[ARRAYS])
                content = RecordDict({ARRAYS: grads, CONFIG: self.stamp(ConfigRecord({**config, STEP: step}), server_round,
                                                                       down=self.down_codec.name, up=self.up_codec.name)})
                message = Message(content, reply.metadata.src_node_id, MessageType.TRAIN)
                (final if reply.content[METRICS].get(LAST, 0.0) else messages).append(message)
        self._server_remote = model
        return final

    def server_step(self, model: AgileNet, optimizer: torch.optim.Optimizer, record: ArrayRecord) -> ArrayRecord:
        """The remote head on one client batch: forward, lambda * CE of the combined logits,
        an SGD step, and the gradients for the client."""
        indices, codebook = (t.to(self.compute) for t in decode_features(record))
        rest = {k: t.to(self.compute) for k, t in decode_tensors(record, [LOCAL, LABELS, ALPHA_W]).items()}
        q = codebook[indices].requires_grad_(True)
        local = rest[LOCAL].requires_grad_(True)
        w = rest[ALPHA_W].reshape(()).requires_grad_(True)
        optimizer.zero_grad(set_to_none=True)
        alpha = torch.sigmoid(w / model.temperature)
        logits = alpha * local + (1 - alpha) * model.remote(q)
        loss = self.hyper.lam * F.cross_entropy(logits, rest[LABELS].long())
        loss.backward()
        optimizer.step()
        return encode_tensors(to_cpu({GRAD_FEATURES: q.grad, GRAD_LOCAL: local.grad, GRAD_ALPHA: w.grad.reshape(1)}),
                              self.grad_values)

    def remote_state(self) -> State:
        return {n: t.detach().cpu().clone() for n, t in self._server_remote.state_dict().items()
                if n.startswith("remote.")}

    # -- central evaluation ------------------------------------------------------------------------

    def evaluate_global(self, arrays: ArrayRecord, test: ClientData) -> dict[str, float]:
        """Combined accuracy once AgileNN trains; the reference's while it is pretrained."""
        model = self.template
        model.load_state_dict(arrays.to_torch_state_dict())
        model.freeze_reference(True)
        batches = list(test.batches(500, None, device=self.compute))
        if self._round_trained <= self.pretrain_rounds:
            with torch.no_grad():
                loss = sum(float(F.cross_entropy(model.reference_logits(x), y, reduction="sum")) for x, y in batches)
            return {"accuracy": reference_accuracy(model, batches), "loss": loss / max(len(test), 1)}
        result = measure(model, batches, AgileLoss(self.hyper, int(model.remote.classifier.out_features)))
        return {"accuracy": result["combined_accuracy"], "loss": result["loss"]}

    @property
    def _round_trained(self) -> int:
        return getattr(self, "_last_round", 0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_round": self._round_trained}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self._last_round = int(state.get("last_round", 0))
