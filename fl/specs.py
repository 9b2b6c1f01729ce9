"""Typed, hashable descriptions of what a run builds: its data and its model.

Hydra stops at the entry point (``fl.simulate``); below it everything takes these frozen
dataclasses. They are hashable so that every client in a process shares one resident federation
and one pool of model objects, and they flatten to Flower's run config (``str -> scalar``) so that
a deployed SuperNode can rebuild them from ``context.run_config``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.nn as nn

from fl.errors import ConfigError

Options = tuple[tuple[str, Any], ...]


def freeze(options: Mapping[str, Any] | None) -> Options:
    """A mapping as a sorted tuple of items (nested mappings frozen too), so that it hashes."""
    items = []
    for key, value in sorted((options or {}).items()):
        if isinstance(value, Mapping):
            value = freeze(value)
        elif isinstance(value, list):
            value = tuple(value)
        items.append((key, value))
    return tuple(items)


def thaw(options: Options) -> dict[str, Any]:
    out = {}
    for key, value in options:
        if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            value = thaw(value)
        out[key] = value
    return out


@dataclass(frozen=True)
class DataSpec:
    name: str
    num_clients: int
    seed: int
    partition: Options = ()
    root: str | None = None
    options: Options = ()

    def federation(self):
        from fl.data import get_federation

        return get_federation(name=self.name, num_clients=self.num_clients, seed=self.seed,
                              partition=thaw(self.partition), root=self.root, **thaw(self.options))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    options: Options = ()

    def build(self, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        from fl.models import get_model

        return get_model(self.name, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                         **thaw(self.options))

    def build_for(self, federation) -> nn.Module:
        return self.build(num_classes=federation.num_classes, in_channels=federation.channels,
                          image_size=federation.image_size)


@dataclass(frozen=True)
class PluginSpec:
    """A plugin by import path and keyword arguments (Hydra's ``_target_`` convention)."""

    name: str
    target: str
    options: Options = ()

    def build(self):
        """The plugin; a ValueError from its constructor (a bad option) or a TypeError from calling it
        (an option it does not take) becomes a ConfigError naming it."""
        import inspect

        from hydra.utils import get_object

        cls = get_object(self.target)
        options = thaw(self.options)
        try:
            inspect.signature(cls).bind(**options)
        except TypeError as exc:
            raise ConfigError(f"plugins.{self.name}", f"{exc}; it takes: {_parameters(cls)}") from None
        except ValueError:  # no signature to check (a builtin): the call below says it
            pass
        try:
            plugin = cls(**options)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"plugins.{self.name}", str(exc)) from None
        plugin.name = self.name  # the config key names it in logs: plugin/<name>/...
        return plugin


@dataclass(frozen=True)
class ClientSpec:
    """Everything a ClientApp needs beyond what each message carries."""

    data: DataSpec
    model: ModelSpec
    seed: int = 0
    plugins: tuple[PluginSpec, ...] = field(default_factory=tuple)
    compute: str = "auto"  # the compute device key, resolved where the client runs (fl.compute)

    RUN_CONFIG_KEY = "fl-client-spec"

    def to_run_config(self) -> dict[str, str]:
        """Flower run config form: one JSON string (run config values must be scalars)."""
        return {self.RUN_CONFIG_KEY: json.dumps(_to_jsonable(self))}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "ClientSpec":
        if cls.RUN_CONFIG_KEY not in run_config:
            raise ConfigError(cls.RUN_CONFIG_KEY, "is not in the run config; under a ServerApp that does not set it "
                                                  "(a stock Flower one), run fl.deploy.client_app:app, which builds it "
                                                  "from the run config's overrides and the node config")
        raw = json.loads(str(run_config[cls.RUN_CONFIG_KEY]))
        return cls(
            data=DataSpec(**{**raw["data"], "partition": freeze(raw["data"]["partition"]),
                             "options": freeze(raw["data"]["options"])}),
            model=ModelSpec(raw["model"]["name"], freeze(raw["model"]["options"])),
            seed=int(raw["seed"]),
            plugins=tuple(PluginSpec(p["name"], p["target"], freeze(p["options"])) for p in raw["plugins"]),
            compute=str(raw.get("compute", "auto")),
        )


def _parameters(cls: Any) -> str:
    import inspect

    names = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    return ", ".join(names) or "no options"


def _to_jsonable(spec: ClientSpec) -> dict[str, Any]:
    return {
        "data": {"name": spec.data.name, "num_clients": spec.data.num_clients, "seed": spec.data.seed,
                 "partition": thaw(spec.data.partition), "root": spec.data.root, "options": thaw(spec.data.options)},
        "model": {"name": spec.model.name, "options": thaw(spec.model.options)},
        "seed": spec.seed,
        "plugins": [{"name": p.name, "target": p.target, "options": thaw(p.options)} for p in spec.plugins],
        "compute": spec.compute,
    }
