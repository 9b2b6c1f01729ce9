"""Strategy registry: a name per strategy class; ``strategy=<name>`` picks its config file."""

from fl.registry import Registry
from strategies.base import FederatedStrategy, weighted_mean
from strategies.fedavg import FedAvg

STRATEGIES: Registry[type] = Registry("strategy", "strategy")
STRATEGIES.register("fedavg")(FedAvg)

__all__ = ["STRATEGIES", "FederatedStrategy", "FedAvg", "weighted_mean"]
