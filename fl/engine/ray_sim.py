"""The ``ray`` engine: Flower's own simulation runtime (``flwr.simulation.run_simulation``) on Ray.

Used as is, for a local Ray or an existing cluster (``ray.address=...``). The ServerApp and
ClientApp are the same objects the ``inprocess`` engine runs.
"""

from __future__ import annotations

from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation


def run_on_ray(server_app: ServerApp, client_app: ClientApp, num_nodes: int, *, num_cpus_per_client: float = 1.0,
               num_gpus_per_client: float = 0.0, address: str | None = None, verbose: bool = False) -> None:
    init_args: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "ERROR" if not verbose else "INFO"}
    if address:
        init_args["address"] = address
    backend_config = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
        "init_args": init_args,
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                   backend_config=backend_config, verbose_logging=verbose)
