"""``python -m fl.simulate [overrides]``: the Hydra entry point, a thin shell around ``fl.run``.

Bad input stops here with one line ``error: <key>: <what is wrong and what to do>`` and exit
status 2, and the run directory Hydra had created is removed (nothing half-written remains).
"""

from __future__ import annotations

import time

LAUNCHED_AT = time.time()  # noqa: E402  (first thing: the start-up benchmark measures from here)

import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fl.errors import ConfigError  # noqa: E402

CONFIG_FILE = "config.yaml"


@hydra.main(version_base="1.3", config_path="pkg://sim_configs", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    from fl.config import build  # heavy imports after Hydra has parsed the command line
    from fl.run import execute
    from fl.results import ERROR_FILE

    if not cfg.get("verbose", False):  # after the imports: importing flwr resets its logger's level
        logging.getLogger("flwr").setLevel(logging.ERROR)

    fresh_dir, resume = run_dir, None
    try:
        if cfg.get("resume"):
            cfg, run_dir, resume = resumed_run(str(cfg.resume))
        server, engine, faults = build(cfg, run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        shutil.rmtree(fresh_dir, ignore_errors=True)
        sys.exit(2)
    if resume is None:
        Path(run_dir, CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    else:
        shutil.rmtree(fresh_dir, ignore_errors=True)
        print(f"resuming {run_dir} after round {resume.round}", flush=True)
    print(start_lines(server), flush=True)
    try:
        summary = execute(server, engine, launched_at=LAUNCHED_AT, resume=resume, faults=faults)
    except BaseException as exc:
        Path(run_dir, ERROR_FILE).write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
        if isinstance(exc, ConfigError):  # found once the run had started: a plugin's options or its check
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
    strategy = getattr(server.make_strategy, "func", server.make_strategy).__name__
    print(f"done: {strategy} on {server.client.data.name}, {server.client.data.num_clients} clients, "
          f"{summary['rounds']} rounds, engine {engine.name}: accuracy {summary['final_accuracy']:.4f} "
          f"(best {summary['best_accuracy']:.4f}), up {summary['cum_up_bytes'] / 2**20:.2f} MiB, "
          f"down {summary['cum_down_bytes'] / 2**20:.2f} MiB, {summary['wall_s']:.1f} s -> {run_dir}")


def resumed_run(run_dir: str):
    """The stored config, the run directory and its last complete checkpoint (ConfigError if none)."""
    from fl.checkpoint import load_checkpoint

    path = Path(run_dir)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError("resume", f"{path} is not a run directory (no {CONFIG_FILE})")
    checkpoint = load_checkpoint(path)
    cfg = OmegaConf.load(path / CONFIG_FILE)
    if checkpoint.round >= int(cfg.rounds):
        raise ConfigError("resume", f"{path} finished all {cfg.rounds} rounds already")
    return cfg, str(path), checkpoint


def start_lines(server) -> str:
    """Printed at start: the model's parameter and MAC counts (the data line is logged by fl.data)."""
    from fl.models import describe

    model = server.client.model
    federation = server.client.data.federation()  # built (and its partition logged) by fl.config
    return f"model: {describe(model.name, model.build_for(federation), in_channels=federation.channels, image_size=federation.image_size)}"


if __name__ == "__main__":
    main()
