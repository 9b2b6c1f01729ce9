"""From the Hydra config to typed specs, with every check done before any work starts.

This is where Hydra stops: ``build(cfg, run_dir)`` validates the config and
returns ``(ServerSpec, EngineSpec)``; nothing below it sees a ``DictConfig``. A bad value raises
``ConfigError`` naming the key and the allowed values. Nothing is silently accepted: a key the
run does not read (``+foo=1``, ``+train.learning_rate=0.1``) is refused, and every plugin is built
once here so that a plugin refusing its options stops the run before any work.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
import socket
from typing import Any, Callable, Mapping

from flwr.serverapp.strategy import Strategy
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from fl.batchnorm import BN_STATS
from fl.clock import clock_spec
from fl.compute import resolve_compute
from fl.errors import ConfigError
from fl.faults import HOSTILE_KINDS, FaultSpec
from fl.hooks import PLUGINS
from fl.execute import EngineSpec, batches_clients
from fl.local_training import TrainHyper
from fl.server import ServerSpec
from fl.specs import ClientSpec, DataSpec, ModelSpec, PluginSpec, freeze
from fl.vectorized import unsupported_reason
import plugins as _shipped_plugins  # noqa: F401  (declares the shipped plugins' names)
from strategies import STRATEGIES, FederatedStrategy
from strategies.base import RobustBounds

log = logging.getLogger(__name__)

ENGINES = ("inprocess", "ray")
RAY_CONNECT_TIMEOUT_S = 5.0
_DATA_KEYS = ("name", "root", "partition")
# The keys the run reads (a Hydra config group or a section of config.yaml); any other is refused.
KEYS = ("seed", "num_clients", "fraction_fit", "fraction_evaluate", "min_fit_clients", "min_evaluate_clients", "rounds",
        "eval_every", "round_timeout", "partition_query", "checkpoint_every", "keep_checkpoint", "resume", "train", "codec", "faults", "robust",
        "ray", "plugins", "tensorboard", "progress", "verbose", "strategy", "data", "model", "engine", "device", "compute")
SECTION_KEYS = {
    "train": ("epochs", "batch_size", "lr", "momentum", "weight_decay", "bn_stats"),
    "codec": ("down", "up"),
    "faults": ("crash", "hang", "late", "nan", "hostile", "hostile_kind", "hang_seconds", "late_seconds"),
    "robust": ("max_weight_ratio", "max_norm_ratio"),
    "ray": ("address", "num_cpus_per_client", "num_gpus_per_client"),
    "engine": ("name", "workers", "torch_threads", "batch_clients"),
    "device": ("profiles", "deadline_s"),
}


def build(cfg: DictConfig, run_dir: str) -> tuple[ServerSpec, EngineSpec, FaultSpec]:
    try:
        c: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except Exception as exc:  # an interpolation that does not resolve, e.g. ${nosuch}
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(str(key), f"{str(exc).splitlines()[0]}; fix the value or the ${{...}} it refers to") from None
    _known_keys(c)
    compute = _compute(c)
    seed = _int(c, "seed", minimum=0)
    num_clients = _int(c, "num_clients", minimum=1)
    rounds = _int(c, "rounds", minimum=1)
    fraction_fit = _fraction(c, "fraction_fit", allow_zero=False)
    fraction_evaluate = _fraction(c, "fraction_evaluate", allow_zero=True)
    min_fit = _int(c, "min_fit_clients", minimum=1)
    min_eval = _int(c, "min_evaluate_clients", minimum=0)
    per_round = max(int(num_clients * fraction_fit), min_fit)
    if per_round > num_clients:
        raise ConfigError("min_fit_clients", f"asks for {per_round} clients per round but num_clients is "
                                             f"{num_clients}; lower min_fit_clients or raise num_clients")
    if fraction_evaluate > 0 and max(int(num_clients * fraction_evaluate), min_eval) > num_clients:
        raise ConfigError("min_evaluate_clients", f"exceeds num_clients={num_clients}")

    # Settings first (cheap checks), then what must be built to be checked: data, model, plugins.
    t = c.get("train") or {}
    hyper = TrainHyper(epochs=_int(t, "epochs", minimum=1, prefix="train."),
                       batch_size=_int(t, "batch_size", minimum=1, prefix="train."),
                       lr=_float(t, "lr", minimum=0.0, prefix="train."),
                       momentum=_float(t, "momentum", minimum=0.0, prefix="train."),
                       weight_decay=_float(t, "weight_decay", minimum=0.0, prefix="train."),
                       bn_stats=_choice(t, "bn_stats", BN_STATS, prefix="train."))
    e = c.get("engine") or {}
    engine_name = str(e.get("name", "inprocess"))
    if engine_name not in ENGINES:
        raise ConfigError("engine.name", f"unknown engine {engine_name!r}; allowed: {', '.join(ENGINES)}")
    ray_cfg = c.get("ray") or {}
    engine = EngineSpec(name=engine_name, workers=_int(e, "workers", minimum=1, prefix="engine."),
                        torch_threads=_int(e, "torch_threads", minimum=1, prefix="engine."),
                        batch_clients=_batch_clients(e, engine_name),
                        ray_address=_address(ray_cfg, check=engine_name == "ray"),
                        ray_cpus_per_client=_float(ray_cfg, "num_cpus_per_client", minimum=0.0, exclusive=True,
                                                   prefix="ray.", default=1.0),
                        ray_gpus_per_client=_gpu_fraction(ray_cfg, local=ray_cfg.get("address") is None,
                                                          check=engine_name == "ray"),
                        verbose=_bool(c, "verbose", False))
    settings = dict(eval_every=_int(c, "eval_every", minimum=0),
                    round_timeout=_float(c, "round_timeout", minimum=0.0, exclusive=True, default=3600.0),
                    tensorboard=_bool(c, "tensorboard", True), progress=_bool(c, "progress", True),
                    checkpoint_every=_int(c, "checkpoint_every", minimum=0),
                    keep_checkpoint=_bool(c, "keep_checkpoint", False))
    device = c.get("device") or {}
    if not isinstance(device.get("profiles") or [], list):
        raise ConfigError("device.profiles", f"must be a list of device profiles, got {device['profiles']!r}; "
                                             "see sim_configs/device/edge_mix.yaml")
    if device.get("deadline_s") is not None:
        _float(device, "deadline_s", minimum=0.0, exclusive=True, prefix="device.")
        if not device.get("profiles"):
            raise ConfigError("device.deadline_s", "needs device profiles to time the clients against; "
                                                   "choose them with device=edge_mix or set device.profiles")
    f = c.get("faults") or {}
    faults = FaultSpec(**{k: _fraction(f, k, allow_zero=True, prefix="faults.")
                          for k in ("crash", "hang", "late", "nan") + (("hostile",) if "hostile" in f else ())},
                       hostile_kind=_choice(f, "hostile_kind", HOSTILE_KINDS, prefix="faults."),
                       hang_seconds=_float(f, "hang_seconds", minimum=0.0, prefix="faults."),
                       late_seconds=_float(f, "late_seconds", minimum=0.0, prefix="faults."), seed=seed)
    codec = c.get("codec") or {}
    down, up = str(codec.get("down", "dense_fp32")), str(codec.get("up", "dense_fp32"))  # the strategy resolves them

    data = _data_spec(c["data"], num_clients, seed)
    model = _model_spec(c["model"])
    plugins = tuple(_plugin_spec(name, pc) for name, pc in (c.get("plugins") or {}).items())
    for plugin in plugins:
        plugin.build()  # a plugin refusing its options stops here (ConfigError naming it), before any work
    client = ClientSpec(data=data, model=model, seed=seed, plugins=plugins, compute=compute)

    try:
        federation = data.federation()  # builds (and validates) the data once, before any round
    except MemoryError as exc:
        raise ConfigError("num_clients", f"{num_clients} clients' data does not fit in this machine's memory "
                                         f"({str(exc).splitlines()[0]}); lower num_clients or the data size "
                                         "per client (data.samples_per_client for synthetic)") from None
    probe = model.build_for(federation)  # fails here, not in a worker, on a bad model option
    if batches_clients(engine, client, faults) and (reason := unsupported_reason(probe)) is not None:
        raise ConfigError("engine.batch_clients", f"model {model.name}: {reason}; set engine.batch_clients=0")
    clock = None
    if (c.get("device") or {}).get("profiles"):
        from fl.models import model_profile

        macs = model_profile(probe, in_channels=federation.channels, image_size=federation.image_size)["macs"]
        clock = clock_spec(c["device"], macs, seed)

    make_strategy = _strategy_factory(c["strategy"], dict(
        fraction_train=fraction_fit, fraction_evaluate=fraction_evaluate, min_train_nodes=min_fit,
        min_evaluate_nodes=min_eval if fraction_evaluate > 0 else 0, min_available_nodes=num_clients,
    ), dict(seed=seed, down_codec=down, up_codec=up, robust=_robust(c.get("robust") or {}),
            partition_query=_bool(c, "partition_query", True)),
        # given only to strategies that declare them (e.g. DELTA needs the model's architecture)
        dict(build_model=lambda: model.build_for(federation), test_set=federation.test,
             compute=resolve_compute(compute)))

    server = ServerSpec(client=client, make_strategy=make_strategy, rounds=rounds, train=hyper, run_dir=run_dir,
                        clock=clock, **settings)
    return server, engine, faults


# -- pieces ------------------------------------------------------------------------------------

def _known_keys(c: Mapping[str, Any]) -> None:
    """Refuse a key the run would ignore (a typo, or one added with ``+``)."""
    for key in c:
        if key not in KEYS:
            raise ConfigError(str(key), f"unknown key; the run reads: {', '.join(KEYS)}")
    for section, keys in SECTION_KEYS.items():
        value = c.get(section)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(section, f"must be a mapping of {', '.join(keys)}, got {value!r}")
        for key in value:
            if key not in keys:
                raise ConfigError(f"{section}.{key}", f"unknown key; {section} takes: {', '.join(keys)}")
    if c.get("resume") is not None and not isinstance(c["resume"], str):
        raise ConfigError("resume", f"must be a run directory, got {c['resume']!r}")
    if not isinstance(c.get("plugins") or {}, Mapping):
        raise ConfigError("plugins", "must be a mapping of plugin name to options; choose plugins with "
                                     "plugins=[name,...] (e.g. plugins=[geometry])")


def _data_spec(d: Mapping[str, Any], num_clients: int, seed: int) -> DataSpec:
    from fl.data import DATASETS

    name = str(d.get("name"))
    options = {k: v for k, v in d.items() if k not in _DATA_KEYS}
    _check_types(DATASETS.get(name), options, "data.")
    return DataSpec(name=name, num_clients=num_clients, seed=seed, partition=freeze(d.get("partition") or {}),
                    root=d.get("root"), options=freeze(options))


def _model_spec(m: Mapping[str, Any]) -> ModelSpec:
    from fl.models import MODELS

    name = str(m.get("name"))
    _check_types(MODELS.get(name), {k: v for k, v in m.items() if k != "name"}, "model.")
    return ModelSpec(name=name, options=freeze({k: v for k, v in m.items() if k != "name"}))


def _plugin_spec(name: str, pc: Mapping[str, Any] | None) -> PluginSpec:
    pc = dict(pc or {})
    target = pc.pop("_target_", None)
    if target is None:
        cls = PLUGINS.get(name)
        target = f"{cls.__module__}.{cls.__qualname__}"
    try:
        cls = get_object(target)
    except Exception as exc:
        raise ConfigError(f"plugins.{name}._target_", f"cannot import {target!r} ({exc})") from None
    _check_types(cls, pc, f"plugins.{name}.")
    return PluginSpec(name=name, target=target, options=freeze(pc))


def _strategy_factory(sc: Mapping[str, Any], flower_kwargs: dict[str, Any], our_kwargs: dict[str, Any],
                      run_kwargs: dict[str, Any] | None = None) -> Callable[[], Strategy]:
    """``run_kwargs`` (the run's ``build_model``, its central ``test_set``, the ``compute`` device
    of its server-side steps) reach only the strategies whose constructor names them."""
    sc = dict(sc)
    target = sc.pop("_target_", None)
    name = sc.pop("name", None)
    sc.pop("_partial_", None)
    if target is not None:
        try:
            cls = get_object(target)
        except Exception as exc:
            raise ConfigError("strategy._target_", f"cannot import {target!r} ({exc}); give a module.Class "
                                                   f"importable from the working directory or one of: "
                                                   f"{', '.join(STRATEGIES.names())}") from None
    elif name is not None:
        cls = STRATEGIES.get(str(name))
    else:
        raise ConfigError("strategy", f"needs a _target_ or a name; registered: {', '.join(STRATEGIES.names())}")
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError("strategy._target_", f"{target} is not a flwr.serverapp.strategy.Strategy subclass")
    kwargs = {**flower_kwargs, **sc}
    if issubclass(cls, FederatedStrategy):
        kwargs.update(our_kwargs)
    else:
        for key in ("down", "up"):
            if our_kwargs[f"{key}_codec"] != "dense_fp32":
                raise ConfigError(f"codec.{key}", f"{cls.__name__} is a plain Flower strategy: its messages carry "
                                                  "dense float32 arrays; remove the codec setting or use a strategy "
                                                  f"of this project ({', '.join(STRATEGIES.names())})")
        log.warning("%s is a plain Flower strategy: its client sampling is Flower's unseeded random.sample",
                    cls.__name__)
    params = inspect.signature(cls).parameters
    kwargs.update({k: v for k, v in (run_kwargs or {}).items() if k in params and k not in sc})
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in sc:
            if key not in params:
                raise ConfigError(f"strategy.{key}", f"{cls.__name__} takes no argument {key!r}; "
                                                     f"it takes: {', '.join(p for p in params if p != 'self')}")
    factory = functools.partial(cls, **kwargs)
    try:  # build it once now, so a bad strategy option stops here, before any work
        factory()
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unexpected and unexpected.group(1) in sc:  # passed on through **kwargs to a class that takes no such option
            raise ConfigError(f"strategy.{unexpected.group(1)}", f"{cls.__name__} takes no argument "
                                                                 f"{unexpected.group(1)!r}; see its docstring") from None
        raise ConfigError("strategy", f"{cls.__name__}: {exc}") from None
    return factory


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_types(fn: Callable[..., Any], options: Mapping[str, Any], prefix: str) -> None:
    """Refuse an option whose value cannot be what ``fn``'s parameter is declared as (``int``,
    ``float``, ``bool`` or ``str``; others are the callee's to check), e.g. data.difficulty=abc."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    for key, value in options.items():
        param = params.get(key)
        kind = getattr(param.annotation, "__name__", param.annotation) if param is not None else None
        if kind not in _KINDS or value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": number and float(value).is_integer(), "float": number, "bool": isinstance(value, bool),
              "str": isinstance(value, str)}[kind]
        if not ok:
            raise ConfigError(prefix + key, f"must be {_KINDS[kind]}, got {value!r}")


def _number(c: Mapping[str, Any], key: str, kind: type, prefix: str) -> Any:
    if key not in c or c[key] is None:
        raise ConfigError(prefix + key, "is required")
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ConfigError(prefix + key, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _compute(c: Mapping[str, Any]) -> str:
    """``compute``: auto (also when absent, e.g. a run directory's config from before the key),
    cpu, cuda or cuda:N, resolved on this machine now (``fl.compute``), so that a GPU it does not
    have stops the run before any work."""
    value = c.get("compute", "auto")
    resolve_compute(value)
    return str(value).strip().lower()


def _batch_clients(e: Mapping[str, Any], engine_name: str) -> int:
    """``engine.batch_clients``: 0 (off, also when absent) or the most clients trained as one vmap."""
    if "batch_clients" not in e:
        return 0
    value = _int(e, "batch_clients", minimum=0, prefix="engine.")
    if value > 0 and engine_name != "inprocess":
        raise ConfigError("engine.batch_clients", f"vectorized clients run on engine=inprocess only, not {engine_name}; "
                          "set engine.batch_clients=0 or engine=inprocess")
    return value


def _int(c: Mapping[str, Any], key: str, *, minimum: int, prefix: str = "") -> int:
    value = _number(c, key, int, prefix)
    if value < minimum:
        raise ConfigError(prefix + key, f"must be >= {minimum}, got {value}")
    return value


def _float(c: Mapping[str, Any], key: str, *, minimum: float, prefix: str = "", exclusive: bool = False,
           default: float | None = None) -> float:
    if default is not None and key not in c:
        return default
    value = _number(c, key, float, prefix)
    if not math.isfinite(value):
        raise ConfigError(prefix + key, f"must be a finite number, got {value}")
    if value < minimum or (exclusive and value == minimum):
        raise ConfigError(prefix + key, f"must be {'>' if exclusive else '>='} {minimum}, got {value}")
    return value


def _robust(c: Mapping[str, Any]) -> RobustBounds:
    bounds = {}
    for key in SECTION_KEYS["robust"]:
        value = c.get(key, getattr(RobustBounds, key))
        if value is not None:
            value = _float(c, key, minimum=1.0, prefix="robust.") if key in c else value
        bounds[key] = value
    return RobustBounds(**bounds)


def _bool(c: Mapping[str, Any], key: str, default: bool, *, prefix: str = "") -> bool:
    value = c.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(prefix + key, f"must be true or false, got {value!r}")
    return value


def _address(ray_cfg: Mapping[str, Any], *, check: bool) -> str | None:
    """``ray.address``; for a ``engine=ray`` run, a host:port must accept a connection within a few
    seconds (a cluster that is not there is one error line, not a hang inside Ray)."""
    value = ray_cfg.get("address")
    if value is not None and not (isinstance(value, str) and value):
        raise ConfigError("ray.address", f"must be null (a local Ray), \"auto\" or host:port, got {value!r}")
    if check and value not in (None, "auto"):
        host, _, port = str(value).removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("ray.address", f"must be null (a local Ray), \"auto\" or host:port, got {value!r}")
        try:
            socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise ConfigError("ray.address", f"cannot reach a Ray cluster at {value} within {RAY_CONNECT_TIMEOUT_S:.0f} s "
                                             f"({exc.strerror or exc}); start its head with `ray start --head "
                                             f"--port={port}` there, or fix the address") from None
    return value


def _gpu_fraction(ray_cfg: Mapping[str, Any], *, local: bool, check: bool) -> float:
    """``ray.num_gpus_per_client``: 0 (CPU clients) or a GPU share in (0, 1] that Flower's Ray backend
    reserves per client; a local Ray needs a CUDA GPU on this machine for it."""
    value = _float(ray_cfg, "num_gpus_per_client", minimum=0.0, prefix="ray.", default=0.0)
    if value > 1:
        raise ConfigError("ray.num_gpus_per_client", f"must be 0 (no GPU) or a share of one GPU in (0, 1], got {value}")
    if check and value > 0 and local:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("ray.num_gpus_per_client", f"{value} asks for a GPU but this machine has no CUDA "
                                                         "device for a local Ray; set 0, or give ray.address of a "
                                                         "cluster with GPUs")
    return value


def _choice(c: Mapping[str, Any], key: str, allowed: tuple[str, ...], *, prefix: str = "") -> str:
    value = c.get(key, allowed[0])
    if value not in allowed:
        raise ConfigError(prefix + key, f"unknown {value!r}; allowed: {', '.join(allowed)}")
    return str(value)


def _fraction(c: Mapping[str, Any], key: str, *, allow_zero: bool, prefix: str = "") -> float:
    value = _number(c, key, float, prefix)
    if not (0.0 < value <= 1.0 or (allow_zero and value == 0.0)):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(prefix + key, f"must be in {interval}, got {value}")
    return value
