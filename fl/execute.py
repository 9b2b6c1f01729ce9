"""Run a configured simulation on one of the two engines and write the run directory.

Run directory contract (docs/run-directory.md): ``config.yaml`` (written by ``fl.simulate``),
TensorBoard event files and ``metrics.jsonl`` (written round by round by ``fl.run_logger``), and,
only when the run completed, ``final_model.pt`` and ``summary.json`` (``fl.outputs``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, RecordDict

from clients.app import build_client_app, first_train_time
from clients.batched import ClientBatching
from fl.checkpoint import Checkpoint
from fl.compute import peak_accelerator_memory
from fl.engine.inprocess import InProcessGrid
from fl.faults import FaultSpec, fault_mod
from fl.outputs import write_results
from fl.server import RunOutcome, ServerSpec, StopRequest, build_server_app, finish_only, run_server
from fl.specs import ClientSpec


@dataclass(frozen=True)
class EngineSpec:
    name: str = "inprocess"  # inprocess | ray
    workers: int = 2  # inprocess: worker threads
    torch_threads: int = 1  # inprocess: torch intra-op threads while clients train
    batch_clients: int = 0  # inprocess: train up to this many dense clients as one vmap (fl/vectorized.py); 0 = off
    ray_address: str | None = None  # ray: an existing cluster ("auto" or host:port); None = local
    ray_cpus_per_client: float = 1.0
    ray_gpus_per_client: float = 0.0  # ray: the GPU share Flower reserves per client (0: CPU clients)
    verbose: bool = False


def batches_clients(engine: EngineSpec, client: ClientSpec, faults: FaultSpec | None) -> bool:
    """Whether the in-process engine trains dense, DELTA and masked clients as one vmap (``engine.batch_clients`` > 1):
    not with plugins or active faults, whose client hooks and mods see one message at a time."""
    return engine.batch_clients > 1 and not client.plugins and not (faults is not None and faults.active)


def client_batching(spec: ServerSpec, engine: EngineSpec, faults: FaultSpec | None) -> ClientBatching | None:
    """The in-process engine's vectorized dense, DELTA and masked clients, or None (``batches_clients``); whether the
    model allows them is checked with the config (``fl.config``)."""
    return ClientBatching(spec.client, engine.batch_clients) if batches_clients(engine, spec.client, faults) else None


def execute(spec: ServerSpec, engine: EngineSpec, *, launched_at: float | None = None,
            resume: Checkpoint | None = None, faults: FaultSpec | None = None,
            stop: StopRequest | None = None) -> dict[str, Any]:
    """Run the federation (from ``resume``'s round on, if given); returns the summary also
    written to ``summary.json``. ``stop`` (signal handlers) may end it early with ``RunStopped``.
    A checkpoint of the last round needs no engine: the outputs are written from it."""
    plugins = [p.build() for p in spec.client.plugins]
    if finish_only(spec, resume):
        outcome = run_server(None, spec, plugins, resume, stop)
        return write_results(spec.run_dir, spec.rounds, outcome, time.time(), engine.name,
                             first_train_unix=None, first_train_s=None, peak_gpu_bytes=None)
    outcome = RunOutcome()
    server_app = build_server_app(spec, plugins, outcome, resume, stop)
    client_app = build_client_app(spec.client, mods=[fault_mod(faults)] if faults and faults.active else None)
    num_nodes = spec.client.data.num_clients
    started = time.time()
    if engine.name == "inprocess":
        before = torch.get_num_threads()
        torch.set_num_threads(engine.torch_threads)
        grid = InProcessGrid(client_app, num_nodes, workers=engine.workers,
                             batch=client_batching(spec, engine, faults))
        try:
            server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        finally:
            grid.close()
            torch.set_num_threads(before)
    elif engine.name == "ray":
        from fl.engine.ray_sim import run_on_ray

        run_on_ray(server_app, client_app, num_nodes, num_cpus_per_client=engine.ray_cpus_per_client,
                   num_gpus_per_client=engine.ray_gpus_per_client,
                   address=engine.ray_address, verbose=engine.verbose)
    else:
        raise ValueError(f"unknown engine {engine.name!r}")
    if outcome.error is not None:
        raise outcome.error
    if outcome.final_arrays is None:
        raise RuntimeError("the ServerApp stopped before finishing its rounds; see the log above")
    first_train = first_train_time()
    return write_results(spec.run_dir, spec.rounds, outcome, started, engine.name, first_train_unix=first_train,
                         first_train_s=None if first_train is None or launched_at is None
                         else round(first_train - launched_at, 3),
                         # this process's GPUs: the in-process engine's clients; Ray's workers are not counted
                         peak_gpu_bytes=peak_accelerator_memory() if engine.name == "inprocess" else None)

