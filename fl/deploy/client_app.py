"""The deployable ClientApp: the project's ClientApp (``clients.app``) with the device mod.

``flwr run`` names ``fl.deploy.client_app:app``; every SuperNode (and every virtual node of a
``flwr run`` simulation) runs it. The handlers are the simulator's own; ``fl.deploy.device.device_mod``
only resolves the run's ``ClientSpec`` from the run config and applies the node config.

Under a ServerApp of your own (a stock Flower strategy), ``app`` works as it is with ``flwr run``
(data settings in the run config's ``overrides``, partitions in the node config). With
``flwr.simulation.run_simulation``, which passes no run config, ``client_app("data=mnist seed=1")``
gives the same app with those overrides as its defaults (a run config's ``overrides`` still
come after them and win).
"""

from __future__ import annotations

import dataclasses

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.app import build_client_app
from fl.deploy.device import device_mod
from fl.deploy.run_config import OVERRIDES

__all__ = ["app", "client_app"]


def client_app(overrides: str = "") -> ClientApp:
    """The deployable ClientApp with ``overrides`` (Hydra overrides, as ``fl.simulate`` takes) put
    before whatever the run config's ``overrides`` key holds."""
    if not overrides:
        return build_client_app(mods=[device_mod])

    def default_overrides(msg: Message, context: Context, call_next) -> Message:
        given = str(context.run_config.get(OVERRIDES, "") or "")
        run_config = {**context.run_config, OVERRIDES: f"{overrides} {given}".strip()}
        return call_next(msg, dataclasses.replace(context, run_config=run_config))

    return build_client_app(mods=[default_overrides, device_mod])


app = client_app()
