"""One device's settings (its ``--node-config``) and the client mod that applies them.

A SuperNode is started with a node config, e.g.::

    flower-supernode ... --node-config 'partition-id=3 num-partitions=10 threads=4 log-dir="/home/pi/fl-log"'
    flower-supernode ... --node-config 'data-root="/home/pi/photos" device-profile="raspberry_pi4"'

| key | meaning |
|---|---|
| ``partition-id``, ``num-partitions`` | which partition of the run's dataset this device trains; ``num-partitions`` is the run's ``num_clients`` when the run config does not set it, else it must equal it (Flower's simulation sets both on every virtual node) |
| ``data-root`` | instead: a local ImageFolder (``<root>/<class>/*.png``) that is this device's whole training set (runs with ``data=imagefolder``) |
| ``threads`` | torch intra-op threads for local training (default: torch's choice, all cores) |
| ``compute`` | this device's compute device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``fl.compute``); it replaces the run's ``compute`` on this node (default: the run config's, else ``auto``: the node's GPU if torch sees one) |
| ``device-profile`` | a profile name of the run's ``device.profiles`` (``device=edge_mix``): picks the DELTA tier |
| ``delta-tier`` | the DELTA tier (0 = full width), overriding the one the profile implies |
| ``log-dir`` | a folder for ``messages.jsonl``: bytes down and up of every message, counted on the device |

``device_mod`` is a Flower client mod around the project's ClientApp (``clients.app``): it composes
the run's config from the run config (``fl.deploy.run_config``; no ``overrides`` key: the shipped
defaults), hands the ClientApp its ``ClientSpec`` (the local-folder view of it when ``data-root`` is
set, sized by ``num-partitions`` when the run config leaves ``num_clients`` alone), sets the thread
count, and counts each message's bytes with the same measure as the server's meter
(``fl.payload.payload_bytes``). Nothing here needs this project's ServerApp: under any ServerApp
the data settings come from the run config and the node config, the training settings from each
message (``clients.trainer.hyper_from``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import Context, Message, MetricRecord
from omegaconf import DictConfig, OmegaConf, open_dict

from fl.compute import COMPUTE_KEY, resolve_compute
from fl.delta.slices import DELTA_TIER
from fl.deploy.run_config import DEPLOY_DEFAULTS, compose, log, overrides_from
from fl.errors import ConfigError
from fl.message_keys import CONFIG, METRICS, NUM_PARTITIONS, PARTITION_ID, SERVER_ROUND
from fl.payload import payload_bytes
from fl.specs import ClientSpec

DATA_ROOT = "data-root"
THREADS = "threads"
DEVICE_PROFILE = "device-profile"
LOG_DIR = "log-dir"
MESSAGES_FILE = "messages.jsonl"
NUM_TIERS = 4  # DELTA's width tiers (strategies.delta): nested prefixes, 0 = full width
LOCAL_DATASET = "imagefolder"


@dataclass(frozen=True)
class DeviceSettings:
    """What ``--node-config`` says about this device (every field optional)."""

    partition_id: int | None = None
    num_partitions: int | None = None
    data_root: str | None = None
    threads: int | None = None
    profile: str | None = None
    tier: int | None = None
    log_dir: str | None = None
    compute: str | None = None  # replaces the run's compute key on this node

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "DeviceSettings":
        def number(key: str, minimum: int) -> int | None:
            if key not in node_config:
                return None
            value = node_config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"node-config {key}", f"must be an integer >= {minimum}, got {value!r}")
            return int(value)

        def text(key: str) -> str | None:
            value = node_config.get(key)
            return None if value in (None, "") else str(value)

        settings = cls(partition_id=number(PARTITION_ID, 0), num_partitions=number(NUM_PARTITIONS, 1),
                       data_root=text(DATA_ROOT), threads=number(THREADS, 1), profile=text(DEVICE_PROFILE),
                       tier=number(DELTA_TIER, 0), log_dir=text(LOG_DIR), compute=text(COMPUTE_KEY))
        if settings.compute is not None:
            resolve_compute(settings.compute, key=f"node-config {COMPUTE_KEY}")  # a GPU this node has
        if settings.data_root is not None and settings.partition_id is not None:
            raise ConfigError(f"node-config {DATA_ROOT}", f"give either {DATA_ROOT} or {PARTITION_ID}, not both")
        if settings.tier is not None and settings.tier >= NUM_TIERS:
            raise ConfigError(f"node-config {DELTA_TIER}", f"must be in [0, {NUM_TIERS - 1}], got {settings.tier}")
        return settings


@dataclass(frozen=True)
class DeviceRun:
    """The run as this device sees it: its ClientSpec, its edge model and its DELTA tier."""

    client: ClientSpec
    num_clients: int  # the run's num_clients (what num-partitions must equal)
    edge_model: str  # the model this device trains and exports (the run's model)
    tier: int | None  # DELTA tier (0 = widest); None when neither a profile nor a tier is given


def delta_tier(profile: str, profiles: list[Mapping[str, Any]], num_tiers: int = NUM_TIERS) -> int:
    """The DELTA tier a device profile implies: an index into the strategy's tier widths, widest first.

    As the DELTA strategy's ``profiles`` assignment ranks the partitions it simulates: the fastest
    profile gets tier 0 (the full-width DELTA), slower ones narrower tiers, spread evenly over
    ``num_tiers``. A deployed node reports it in its reply to the partition query (``delta-tier``),
    since only the device knows what it is; ``--node-config delta-tier=k`` overrides it per device.
    """
    names = [str(p["name"]) for p in profiles]
    if profile not in names:
        raise ConfigError(f"node-config {DEVICE_PROFILE}",
                          f"unknown profile {profile!r}; the run's device.profiles are: {', '.join(names) or 'none'} "
                          "(choose them with the run's device=... override)")
    speeds = sorted({float(p["macs_per_s"]) for p in profiles}, reverse=True)
    rank = speeds.index(float(profiles[names.index(profile)]["macs_per_s"]))
    return min(rank * num_tiers // len(speeds), num_tiers - 1)


def device_run(run_config: Mapping[str, Any], device: DeviceSettings) -> DeviceRun:
    """Compose the run's config and build what the ClientApp needs (memoized per process)."""
    return _device_run(tuple(overrides_from(run_config)), device.data_root, device.profile, device.tier,
                       device.num_partitions, device.compute)


@functools.lru_cache(maxsize=8)
def _device_run(overrides: tuple[str, ...], data_root: str | None, profile: str | None, tier: int | None,
                num_partitions: int | None = None, compute: str | None = None) -> DeviceRun:
    from fl.config import build

    cfg = compose(list(overrides))
    if compute is not None:  # the node's own device wins over the run's (fl.compute)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.compute = compute
    if num_partitions is not None and not sets_num_clients(overrides, cfg):
        cfg = sized_view(cfg, num_partitions)
    num_clients = int(cfg.num_clients)
    if profile is not None and tier is None:
        tier = delta_tier(profile, OmegaConf.to_container(cfg.device.profiles, resolve=True))
    if data_root is not None:
        cfg = local_view(cfg, data_root)
    spec, _, _ = build(cfg, run_dir="")
    return DeviceRun(client=spec.client, num_clients=num_clients, edge_model=spec.client.model.name, tier=tier)


def sets_num_clients(overrides: tuple[str, ...], cfg: DictConfig) -> bool:
    """Whether the run config chose ``num_clients`` (an override of it, or a preset that changes it)."""
    named = any(o.split("=", 1)[0].lstrip("+~") == "num_clients" for o in overrides)
    return named or int(cfg.num_clients) != _shipped_num_clients()


@functools.lru_cache(maxsize=1)
def _shipped_num_clients() -> int:
    return int(compose(list(DEPLOY_DEFAULTS)).num_clients)


def sized_view(cfg: DictConfig, num_partitions: int) -> DictConfig:
    """The run split into ``num_partitions`` clients (the node config's ``num-partitions``).

    The server-side minimums are capped at that size: a client builds the run's specs, and with
    a ServerApp of someone else's they describe nothing that runs."""
    sized = cfg.copy()
    with open_dict(sized):
        sized.num_clients = num_partitions
        sized.min_fit_clients = min(int(sized.min_fit_clients), num_partitions)
        sized.min_evaluate_clients = min(int(sized.min_evaluate_clients), num_partitions)
    return sized


def local_view(cfg: DictConfig, data_root: str) -> DictConfig:
    """The run as a device holding only a local ImageFolder sees it: a federation of one client.

    Everything that shapes the model (dataset options such as image size and channels, the model,
    the plugins, the seed) stays the run's; the class folders must be the server's (ImageFolder
    numbers classes by sorted folder name).
    """
    if str(cfg.data.name) != LOCAL_DATASET:
        raise ConfigError(f"node-config {DATA_ROOT}",
                          f"a local data folder needs a run with data={LOCAL_DATASET} (this run uses "
                          f"data={cfg.data.name}); or give partition-id and num-partitions instead")
    local = cfg.copy()
    with open_dict(local):
        local.data.root = str(Path(data_root).expanduser())
        local.data.partition = {"name": "iid"}
        local.num_clients = 1
        local.fraction_fit = 1.0
        local.min_fit_clients = 1
        local.fraction_evaluate = 0.0
        local.min_evaluate_clients = 0
    return local


def device_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: apply this device's settings around the ClientApp, log the bytes."""
    device = DeviceSettings.from_node_config(context.node_config)
    if device.threads is not None:
        torch.set_num_threads(device.threads)
    run = device_run(context.run_config, device)
    if device.num_partitions is not None and device.num_partitions != run.num_clients:
        raise ConfigError(f"node-config {NUM_PARTITIONS}",
                          f"is {device.num_partitions} but the run has num_clients={run.num_clients}")
    node_config = dict(context.node_config)
    is_query = msg.metadata.message_type.startswith("query")
    if device.data_root is not None and not is_query:
        node_config[PARTITION_ID] = 0  # the one partition of the local view (queries report none)
    inner = dataclasses.replace(context, node_config=node_config,
                                run_config={**context.run_config, **run.client.to_run_config()})
    started = time.perf_counter()
    reply = call_next(msg, inner)
    if is_query and run.tier is not None and reply.has_content() and METRICS in reply.content:
        reply.content[METRICS] = MetricRecord({**reply.content[METRICS], DELTA_TIER: run.tier})
    log_message(device, context, msg, reply, time.perf_counter() - started)
    return reply


def log_message(device: DeviceSettings, context: Context, msg: Message, reply: Message, seconds: float) -> dict:
    """One message's bytes as counted on the device: a log line, and a JSON line under ``log-dir``."""
    config = msg.content.get(CONFIG) if msg.has_content() else None
    entry = {
        "time": round(time.time(), 3),
        "run_id": context.run_id,
        "node_id": context.node_id,
        "partition": device.partition_id,
        "type": msg.metadata.message_type,
        "round": int(config.get(SERVER_ROUND, 0)) if config is not None else 0,
        "down_bytes": payload_bytes(msg.content) if msg.has_content() else 0,
        "up_bytes": payload_bytes(reply.content) if reply.has_content() else 0,
        "error": reply.has_error(),
        "seconds": round(seconds, 4),
    }
    log.info("%s round %d: down %d B, up %d B, %.2f s", entry["type"], entry["round"], entry["down_bytes"],
             entry["up_bytes"], seconds)
    if device.log_dir is not None:
        folder = Path(device.log_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / MESSAGES_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    return entry
