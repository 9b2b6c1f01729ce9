"""The ``ray`` engine: Flower's own simulation runtime (``flwr.simulation.run_simulation``) on Ray.

Used as is, for a local Ray or an existing cluster (``ray.address=...``). The ServerApp and
ClientApp are the same objects the ``inprocess`` engine runs.

Signals: ``ray.init`` replaces the driver's SIGTERM handler with ``sys.exit`` and installs
abseil's failure signal handler (a stack dump and an abort 3 s later). Either would end a run
that is finishing its round to stop at a clean point (``fl.server.StopRequest``), the first one
leaving Flower's ServerApp thread waiting forever for replies. So Ray is started here, the way
Flower's backend starts it (which then finds it running), and the handler that was in place
before comes back.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

# Read by ray._private.ray_constants when Ray is first imported.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

import ray  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402


def run_on_ray(server_app: ServerApp, client_app: ClientApp, num_nodes: int, *, num_cpus_per_client: float = 1.0,
               num_gpus_per_client: float = 0.0, address: str | None = None, verbose: bool = False) -> None:
    init_args: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "ERROR" if not verbose else "INFO",
                                 "include_dashboard": False}
    if address:
        init_args["address"] = address
    _init_keeping_sigterm(init_args)
    backend_config = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
        "init_args": init_args,
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                   backend_config=backend_config, verbose_logging=verbose)  # its backend shuts Ray down


def _init_keeping_sigterm(init_args: dict[str, Any]) -> None:
    """``ray.init`` as Flower's Ray backend calls it (the workers get the driver's ``sys.path``),
    with this process's SIGTERM handler put back afterwards."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    pythonpath = os.pathsep.join(sys.path + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    if main and before is not None:
        signal.signal(signal.SIGTERM, before)
