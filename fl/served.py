"""What the server asks of a strategy beyond Flower's ``Strategy``.

Flower's round loop (``Strategy.start``) only calls ``configure_*`` and ``aggregate_*``. A
simulation also checkpoints the strategy's state, counts the updates it rejected and may let it
evaluate its own global model (AgileNN's split network). A strategy declares these by deriving
from ``ServedStrategy`` (the simulator's strategies do, through ``FederatedStrategy``); a plain
Flower strategy is served by ``served()`` with this class's neutral answers: no state, no
rejections, and the run's model evaluates the global weights.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fl.local_training import ClientData


class ServedStrategy:
    """A mixin for ``flwr.serverapp.strategy.Strategy`` subclasses; every method has a neutral default."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to continue the run bit-identically."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s result."""

    def rejected(self, server_round: int) -> list[str]:
        """One line per update of ``server_round`` that was not aggregated, and why."""
        return []

    def evaluate_global(self, arrays: ArrayRecord, test: ClientData) -> dict[str, float] | None:
        """``{"accuracy", "loss", ...}`` of the global model on the central test set, or None when
        the run's model loaded with ``arrays`` is the global model (the server evaluates it)."""
        return None


def served(strategy: Strategy) -> ServedStrategy:
    """``strategy`` itself when it declares what the server asks, else the neutral answers."""
    return strategy if isinstance(strategy, ServedStrategy) else ServedStrategy()
