"""Run a configured simulation on one of the two engines and write the run directory.

Run directory contract (README, "Run directory"): ``config.yaml`` (written by ``fl.simulate``),
TensorBoard event files and ``metrics.jsonl`` (written round by round by ``fl.runlog``), and,
only when the run completed, ``final_model.pt`` and ``summary.json`` (each written to a
temporary file and renamed, so a crashed run never leaves a final model behind).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, RecordDict

from clients.app import build_client_app, first_train_time
from fl.checkpoint import Checkpoint
from fl.faults import FaultSpec, fault_mod
from fl.engine.inprocess import InProcessGrid
from fl.server import RunOutcome, ServerSpec, build_server_app

SUMMARY_FILE = "summary.json"
FINAL_MODEL_FILE = "final_model.pt"


@dataclass(frozen=True)
class EngineSpec:
    name: str = "inprocess"  # inprocess | ray
    workers: int = 2  # inprocess: worker threads
    torch_threads: int = 1  # inprocess: torch intra-op threads while clients train
    ray_address: str | None = None  # ray: an existing cluster ("auto" or host:port); None = local
    ray_cpus_per_client: float = 1.0
    verbose: bool = False


def execute(spec: ServerSpec, engine: EngineSpec, *, launched_at: float | None = None,
            resume: Checkpoint | None = None, faults: FaultSpec | None = None) -> dict[str, Any]:
    """Run the federation (from ``resume``'s round on, if given); returns the summary also
    written to ``summary.json``."""
    plugins = [p.build() for p in spec.client.plugins]
    outcome = RunOutcome()
    server_app = build_server_app(spec, plugins, outcome, resume)
    client_app = build_client_app(spec.client, mods=[fault_mod(faults)] if faults and faults.active else None)
    num_nodes = spec.client.data.num_clients
    started = time.time()
    if engine.name == "inprocess":
        torch.set_num_threads(engine.torch_threads)
        grid = InProcessGrid(client_app, num_nodes, workers=engine.workers)
        try:
            server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        finally:
            grid.close()
    elif engine.name == "ray":
        from fl.engine.ray_sim import run_on_ray

        run_on_ray(server_app, client_app, num_nodes, num_cpus_per_client=engine.ray_cpus_per_client,
                   address=engine.ray_address, verbose=engine.verbose)
    else:
        raise ValueError(f"unknown engine {engine.name!r}")
    if outcome.error is not None:
        raise outcome.error
    if outcome.final_arrays is None:
        raise RuntimeError("the ServerApp stopped before finishing its rounds; see the log above")
    run_dir = Path(spec.run_dir)
    _atomic_save(outcome.final_arrays.to_torch_state_dict(), run_dir / FINAL_MODEL_FILE)
    last = outcome.rows[-1]
    evaluated = [r for r in outcome.rows if r["accuracy"] is not None]
    first_train = first_train_time()
    summary = {
        "status": "complete",
        "rounds": spec.rounds,
        "final_accuracy": evaluated[-1]["accuracy"],
        "final_loss": evaluated[-1]["loss"],
        "best_accuracy": max(r["accuracy"] for r in evaluated),
        "cum_up_bytes": last["cum_up_bytes"],
        "cum_down_bytes": last["cum_down_bytes"],
        "control_bytes": outcome.control_bytes,
        "wall_s": round(time.time() - started, 3),
        "engine": engine.name,
        "first_train_unix": first_train,
        "first_train_s": None if first_train is None or launched_at is None else round(first_train - launched_at, 3),
    }
    _atomic_write_text(json.dumps(summary, indent=2), run_dir / SUMMARY_FILE)
    return summary


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
