"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017), Algorithm 1:

    configure:  sample m = max(C * K, min) clients with the run's seeded sampler and send each
                the global weights w_t (dense payload, ``down_codec``)
    train:      each client runs ClientUpdate: E epochs of SGD with batch B (``fl.local_training``)
    aggregate:  w_{t+1} = sum_k (n_k / n) w_{t+1}^k   (``weighted_mean``, in partition order)

Sampling, codecs, reply ordering and the screening of every reply come from ``FederatedStrategy``
(its ``aggregate_train`` hands the sound updates to ``aggregate_updates``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fl.message_keys import ARRAYS, CONFIG
from fl.payload import State
from strategies.base import FederatedStrategy, Update, weighted_mean


class FedAvg(FederatedStrategy):
    # -- configure ---------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        self.reference = arrays.to_torch_state_dict()
        nodes = self.sample(grid, server_round, "train", self.fraction_train, self.min_train_nodes)
        content = self.broadcast(arrays, self.stamp(config, server_round, down=self.down_codec.name,
                                                    up=self.up_codec.name))
        return [Message(content, node, MessageType.TRAIN) for node in nodes]

    # -- aggregate ---------------------------------------------------------------------------

    def aggregate_updates(self, server_round: int,
                          updates: Sequence[Update]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        states, weights = self.decode_replies(updates)
        new_state = self.server_update(server_round, states, weights)
        metrics = self.client_metrics(updates)
        return ArrayRecord(new_state), metrics

    def server_update(self, server_round: int, states: Sequence[State], weights: Sequence[float]) -> State:
        """w_{t+1} = sum_k (n_k / n) w^k; FedAvgM/FedOpt-style variants override this one hook."""
        return weighted_mean(states, weights)

    # -- federated evaluation (optional; the run also evaluates the global model centrally) ---

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.sample(grid, server_round, "evaluate", self.fraction_evaluate, self.min_evaluate_nodes)
        content = RecordDict({ARRAYS: arrays, CONFIG: self.stamp(config, server_round, down="dense_fp32")})
        return [Message(content, node, MessageType.EVALUATE) for node in nodes]
