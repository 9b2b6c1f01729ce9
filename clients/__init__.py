"""Client side: the ClientApp (``clients.app``) and the trainers it dispatches to by name."""

from clients import dense_trainer  # noqa: F401  (registers "dense")
from clients.trainer import TRAINERS, ClientEnv, register_trainer

__all__ = ["TRAINERS", "ClientEnv", "register_trainer"]
