"""Compose the shipped config with overrides and run it, in-process (fast) or as the CLI does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# Tests pin their local training (the shipped defaults may be retuned) and skip checkpoints.
SMALL = ["num_clients=6", "fraction_fit=0.5", "rounds=2", "progress=false", "tensorboard=false", "checkpoint_every=0",
         "train.epochs=1", "train.batch_size=32", "train.lr=0.05", "train.momentum=0.0"]
SMALL_SYNTHETIC = ["data.samples_per_client=16", "data.test_size=64", "data.partition.name=shards",
                   "++data.partition.classes_per_client=3"]


def compose_config(overrides: list[str]):
    with initialize_config_module(config_module="sim_configs", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_inprocess(tmp_path: Path, overrides: list[str]) -> tuple[dict, Path]:
    from fl.config import build
    from fl.execute import execute

    other_data = any(o.startswith("data=") for o in overrides)
    cfg = compose_config(SMALL + ([] if other_data else SMALL_SYNTHETIC) + overrides)
    server, engine, faults = build(cfg, str(tmp_path))
    Path(tmp_path).mkdir(parents=True, exist_ok=True)
    Path(tmp_path, "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")  # as fl.simulate does
    return execute(server, engine, faults=faults), tmp_path


def cli_env() -> dict[str, str]:
    """The environment of a subprocess that imports this checkout's packages."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl.simulate", *args], cwd=cwd or ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
