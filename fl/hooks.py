"""The plugin protocol: callbacks with do-nothing defaults that a run calls at fixed points.

Server side (called by ``fl.server`` around Flower's ``Strategy.start`` loop):
    on_run_start(run)                      before round 1
    before_round(run, server_round)        before the round's messages are configured
    after_aggregate(run, server_round, arrays)   on the new global ArrayRecord
    after_round(run, server_round, row)    with the round's logged metrics
    on_run_end(run)                        after the last round
Client side (called by the ClientApp around local training, on any engine or device):
    before_train(client, model, config)
    after_train(client, model, metrics)    may return scalars, sent back in the reply's metrics
    on_payload(client, record)             may transform the ArrayRecord about to be sent

Server hooks return a ``Report`` (scalars, histograms, images, text) or None; the run logger
writes it under ``plugin/<name>/``. Plugins never write logs themselves.
A user plugin is one file with a ``Plugin`` subclass plus ``+plugins.<name>._target_=module.Class``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
from flwr.app import ArrayRecord, ConfigRecord

from fl.registry import Registry


@dataclass
class Report:
    """What a hook hands to the logger: scalars, histograms (1-D arrays), images (HWC uint8), text,
    and files (name in the run directory -> text, e.g. a self-contained HTML report)."""

    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class RunView:
    """What a server hook may look at: the run's data, a model factory, the current global model,
    and the compute device (``fl.compute``) that a hook's own training and measurements use. The
    models ``build_model``/``load_global`` give are on the CPU: a hook moves what it computes with."""

    run_dir: str
    federation: Any
    build_model: Callable[[], nn.Module]
    load_global: Callable[[ArrayRecord], nn.Module]
    num_rounds: int
    initial_arrays: ArrayRecord  # the global model every strategy starts from
    device: torch.device = torch.device("cpu")  # the run's compute device, resolved on the server


@dataclass
class ClientView:
    """What a client hook may look at: which partition this node trains and the round."""

    partition_id: int
    server_round: int
    state: Any  # the node's persistent Flower Context.state (a RecordDict)


class Plugin:
    """Base class: every hook does nothing."""

    name = "plugin"

    # server side
    def on_run_start(self, run: RunView) -> Report | None:
        return None

    def before_round(self, run: RunView, server_round: int) -> Report | None:
        return None

    def after_aggregate(self, run: RunView, server_round: int, arrays: ArrayRecord) -> Report | None:
        return None

    def after_round(self, run: RunView, server_round: int, row: Mapping[str, Any]) -> Report | None:
        return None

    def on_run_end(self, run: RunView) -> Report | None:
        return None

    # client side
    def before_train(self, client: ClientView, model: nn.Module, config: ConfigRecord) -> None:
        return None

    def after_train(self, client: ClientView, model: nn.Module, metrics: Mapping[str, float]) -> dict[str, float] | None:
        return None

    def on_payload(self, client: ClientView, record: ArrayRecord) -> ArrayRecord:
        return record


PLUGINS: Registry[type[Plugin]] = Registry("plugin", "plugins")


def register_plugin(name: str):
    def decorator(cls: type[Plugin]) -> type[Plugin]:
        PLUGINS.register(name)(cls)
        cls.name = name
        return cls

    return decorator
