"""Strategy registry: a name per strategy class; ``strategy=<name>`` picks its config file."""

from fl.registry import Registry
from strategies.agilenn import AgileNN
from strategies.base import FederatedStrategy, weighted_mean
from strategies.delta import DeltaFactorized
from strategies.fedavg import FedAvg
from strategies.feddst import FedDST
from strategies.hermes import Hermes

STRATEGIES: Registry[type] = Registry("strategy", "strategy")
STRATEGIES.register("agilenn")(AgileNN)
STRATEGIES.register("delta")(DeltaFactorized)
STRATEGIES.register("fedavg")(FedAvg)
STRATEGIES.register("feddst")(FedDST)
STRATEGIES.register("hermes")(Hermes)

__all__ = ["STRATEGIES", "AgileNN", "DeltaFactorized", "FederatedStrategy", "FedAvg", "FedDST", "Hermes", "weighted_mean"]
