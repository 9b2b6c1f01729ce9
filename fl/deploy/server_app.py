"""The deployable ServerApp: ``flwr run`` runs it on the SuperLink against real SuperNodes.

Its main is what ``python -m fl.simulate`` does, with Flower's real Grid in place of an engine:
compose the config from the run config's ``overrides`` (``fl.deploy.run_config``), build the specs
(``fl.config.build``), run the rounds (``fl.server.run_server``, which meters every message on the
Grid) and write the same run directory: ``config.yaml``, ``metrics.jsonl``, TensorBoard events,
and on completion ``final_model.pt`` and ``summary.json`` (``error.txt`` when it failed).
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fl.deploy.run_config import compose, log, overrides_from, run_dir_from
from fl.errors import ConfigError
from fl.outputs import ERROR_FILE, write_results
from fl.server import run_server

CONFIG_FILE = "config.yaml"
ENGINE = "flwr-run"  # summary.json's "engine": Flower's runtime (SuperLink + SuperNodes, or its simulation)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fl.config import build

    cfg = compose(overrides_from(context.run_config))
    if cfg.get("resume"):  # the SuperNodes compose their config from the overrides, not a stored run's
        raise ConfigError("resume", "is not supported by a deployed run; start a new run with the stored "
                                    "run's overrides")
    run_dir = run_dir_from(context.run_config, cfg)
    spec, _, faults = build(cfg, run_dir)
    if faults.active:
        log.warning("faults.* are simulated faults; a deployment ignores them")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    Path(run_dir, CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    print(f"deployment run {context.run_id}: {spec.client.data.num_clients} SuperNodes, {spec.rounds} rounds "
          f"-> {Path(run_dir).resolve()}", flush=True)
    started = time.time()
    try:
        outcome = run_server(grid, spec, [p.build() for p in spec.client.plugins])
    except BaseException as exc:
        Path(run_dir, ERROR_FILE).write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
        raise
    summary = write_results(run_dir, spec.rounds, outcome, started, ENGINE)
    print(f"done: accuracy {summary['final_accuracy']:.4f}, up {summary['cum_up_bytes'] / 2**20:.2f} MiB, "
          f"down {summary['cum_down_bytes'] / 2**20:.2f} MiB, {summary['wall_s']:.1f} s -> {run_dir}", flush=True)
