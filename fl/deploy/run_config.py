"""The deployed run's configuration: Hydra overrides carried in Flower's run config.

A ``flwr run`` hands every ServerApp and ClientApp the same run config (``[tool.flwr.app.config]``
in ``pyproject.toml``, overridden by ``flwr run --run-config``). Its ``overrides`` key holds Hydra
overrides of the shipped config tree, e.g. ``"num_clients=2 rounds=5 model=cnn_small"``; both sides
compose the config from it and build the typed specs with ``fl.config.build``, exactly as
``python -m fl.simulate`` does, so simulation and deployment read one config.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from fl.errors import ConfigError

OVERRIDES = "overrides"  # run config key: Hydra overrides, one string
RUN_DIR = "run-dir"  # run config key: where the ServerApp writes the run directory ("" = default)

# Put before the user's overrides (which win): a deployed ServerApp's output is collected by the
# SuperLink as a log, where a progress bar only adds noise.
DEPLOY_DEFAULTS = ("progress=false",)

# A child of Flower's logger: its console handler prints on the SuperLink and the SuperNodes.
log = logging.getLogger("flwr.deploy")

_compose_lock = threading.Lock()  # Hydra's global state: one compose at a time per process


def overrides_from(run_config: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides of a run config (shell-style quoting allowed), deploy defaults first."""
    raw = run_config.get(OVERRIDES, "")
    if not isinstance(raw, str):
        raise ConfigError(OVERRIDES, f"run config {OVERRIDES!r} must be a string of Hydra overrides, got {raw!r}")
    try:
        return [*DEPLOY_DEFAULTS, *shlex.split(raw)]
    except ValueError as err:
        raise ConfigError(OVERRIDES, f"cannot split {raw!r}: {err}") from None


def compose(overrides: list[str]) -> DictConfig:
    """The shipped config (``sim_configs/``) with ``overrides`` applied, as ``fl.simulate`` sees it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException

    with _compose_lock:
        try:
            with initialize_config_module(config_module="sim_configs", version_base="1.3"):
                return hydra_compose(config_name="config", overrides=overrides)
        except HydraException as err:
            raise ConfigError(OVERRIDES, str(err).splitlines()[0]) from None


def run_dir_from(run_config: Mapping[str, Any], cfg: DictConfig) -> str:
    """The run directory: the ``run-dir`` key, else ``runs/<date>_<time>_deploy_<strategy>``."""
    given = str(run_config.get(RUN_DIR, "") or "")
    if given:
        return str(Path(given).expanduser())
    target = str(cfg.strategy.get("_target_") or cfg.strategy.get("name") or "strategy")
    return str(Path("runs") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_deploy_{target.rsplit('.', 1)[-1].lower()}")
