"""Client side: the ClientApp (``clients.app``) and the trainers it dispatches to by name."""

from clients import agilenn_trainer  # noqa: F401  (registers "agilenn": AgileNN split training)
from clients import delta_trainer  # noqa: F401  (registers "delta": DELTA-factorized)
from clients import fedavg_trainer  # noqa: F401  (registers "dense": FedAvg's ClientUpdate)
from clients import feddst_trainer  # noqa: F401  (registers "masked": FedDST)
from clients import hermes_trainer  # noqa: F401  (registers "hermes")
from clients.trainer import EVALUATORS, TRAINERS, ClientEnv, register_evaluator, register_trainer

__all__ = ["EVALUATORS", "TRAINERS", "ClientEnv", "register_evaluator", "register_trainer"]
