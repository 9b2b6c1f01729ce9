"""Deployment: the project as a Flower app (``flwr run``), device settings, and real processes.

Fast tests check the app's ``pyproject.toml`` with Flower's own validator, the device settings
and the deployed ServerApp/ClientApp pair on the in-process grid. The ``slow`` tests start a real
``flower-superlink`` and ``flower-supernode`` processes on 127.0.0.1 (free ports picked at run
time) and run the app with ``flwr run``: once plain (``--insecure``), once with TLS and SuperNode
authentication, where a SuperNode whose key was never registered must be refused. Every process
(and what it spawned) is stopped by the ``processes`` fixture, also when a test fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl.deploy.certs import make_node_keys, make_tls
from fl.deploy.device import (
    DELTA_TIER,
    MESSAGES_FILE,
    DeviceSettings,
    delta_tier,
    device_mod,
    device_run,
)
from fl.deploy.run_config import OVERRIDES, RUN_DIR, compose, overrides_from
from fl.errors import ConfigError
from fl.message_keys import ARRAYS, CONFIG, METRICS, NUM_PARTITIONS, PARTITION_ID, QUERY_PARTITION, SERVER_ROUND
from fl.run_logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ("num_clients=2 fraction_fit=1.0 data.samples_per_client=8 data.test_size=32 "
        "checkpoint_every=0")
PROFILES = [{"name": "pi", "macs_per_s": 1e9}, {"name": "phone", "macs_per_s": 4e9},
            {"name": "jetson", "macs_per_s": 2e10}, {"name": "laptop", "macs_per_s": 6e10}]


# -- the Flower app ---------------------------------------------------------------------------------

def test_pyproject_is_a_valid_flower_app():
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    config, _ = load_and_validate(ROOT / "pyproject.toml")  # raises on an invalid app
    flwr = config["tool"]["flwr"]
    assert flwr["app"]["components"] == {"serverapp": "fl.deploy.server_app:app",
                                         "clientapp": "fl.deploy.client_app:app"}
    assert "federations" not in flwr  # `flwr run` would move it to $FLWR_HOME and rewrite this file
    import io
    import zipfile

    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist())
    assert {"fl/deploy/server_app.py", "fl/deploy/client_app.py", "clients/app.py", "sim_configs/config.yaml",
            "sim_configs/strategy/fedavg.yaml"} <= names
    assert not any(n.startswith("runs/") for n in names)


def test_documented_superlink_connections_parse():
    """docs/flower-config.toml, read by Flower's own parser of $FLWR_HOME/config.toml."""
    import tomllib

    from flwr.cli.flower_config import parse_superlink_connection

    tables = tomllib.loads((ROOT / "docs" / "flower-config.toml").read_text())["superlink"]
    connections = {name: parse_superlink_connection(t, name) for name, t in tables.items() if isinstance(t, dict)}
    assert set(connections) == {"local-simulation", "local-deployment", "deployed"}
    assert tables["default"] in connections
    assert connections["local-simulation"].address == ":local:"
    assert connections["local-deployment"].address.startswith("127.0.0.1:") and connections["local-deployment"].insecure
    assert connections["deployed"].root_certificates and not connections["deployed"].insecure


def test_default_run_config_builds():
    """The defaults in [tool.flwr.app.config] compose and pass fl.config's checks."""
    import tomllib

    from fl.config import build

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(defaults) == {OVERRIDES, RUN_DIR}
    server, _, _ = build(compose(overrides_from(defaults)), "unused")
    assert server.client.data.num_clients == 2


def test_overrides_are_split_like_a_shell_and_bad_ones_name_the_key():
    assert overrides_from({OVERRIDES: "rounds=2 'train.lr=0.1'"})[-2:] == ["rounds=2", "train.lr=0.1"]
    with pytest.raises(ConfigError, match="overrides"):
        compose(overrides_from({OVERRIDES: "no_such_group=1"}))


# -- device settings ----------------------------------------------------------------------------------

def test_device_settings_from_node_config():
    s = DeviceSettings.from_node_config({PARTITION_ID: 3, NUM_PARTITIONS: 10, "threads": 4,
                                         "device-profile": "pi", "log-dir": "/tmp/x"})
    assert (s.partition_id, s.num_partitions, s.threads, s.profile, s.log_dir, s.data_root) == (3, 10, 4, "pi", "/tmp/x", None)
    with pytest.raises(ConfigError, match="threads"):
        DeviceSettings.from_node_config({"threads": 0})
    with pytest.raises(ConfigError, match="data-root"):
        DeviceSettings.from_node_config({PARTITION_ID: 0, "data-root": "/data"})
    with pytest.raises(ConfigError, match="delta-tier"):
        DeviceSettings.from_node_config({"delta-tier": 4})


def test_delta_tier_ranks_profiles_by_compute_fastest_widest():
    assert [delta_tier(p["name"], PROFILES) for p in PROFILES] == [3, 2, 1, 0]
    assert delta_tier("pi", PROFILES[:1]) == 0  # one kind of device: the full-width DELTA
    assert delta_tier("phone", PROFILES[:2]) == 0 and delta_tier("pi", PROFILES[:2]) == 2
    with pytest.raises(ConfigError, match="unknown profile 'watch'"):
        delta_tier("watch", PROFILES)


def test_device_profile_picks_tier_from_the_runs_profiles():
    run = device_run({OVERRIDES: f"{TINY} device=edge_mix"}, DeviceSettings(profile="raspberry_pi4"))
    assert run.tier == 3 and run.edge_model == "cnn_small"  # the slowest of four profiles: the narrowest tier
    run = device_run({OVERRIDES: f"{TINY} device=edge_mix"}, DeviceSettings(profile="laptop", tier=1))
    assert run.tier == 1  # the node config's delta-tier wins


def _image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_local_data_root_is_a_one_client_view_of_an_imagefolder_run(tmp_path):
    server_data = _image_folder(tmp_path / "server")
    device_data = _image_folder(tmp_path / "device", per_class=4)
    overrides = f"data=imagefolder data.root={server_data} num_clients=2 data.image_size=16"
    run = device_run({OVERRIDES: overrides}, DeviceSettings(data_root=str(device_data)))
    assert run.client.data.num_clients == 1 and run.client.data.root == str(device_data)
    assert dict(run.client.data.options)["image_size"] == 16 and run.num_clients == 2
    with pytest.raises(ConfigError, match="data=imagefolder"):
        device_run({OVERRIDES: TINY}, DeviceSettings(data_root=str(device_data)))


# -- the deployed ClientApp and ServerApp, in-process ---------------------------------------------------

def _context(node_config, run_config) -> Context:
    return Context(run_id=7, node_id=11, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_client_app_trains_and_logs_bytes_on_the_device(tmp_path):
    from fl.deploy.client_app import app
    from fl.models import get_model
    from fl.payload import payload_bytes

    run_config = {OVERRIDES: f"{TINY} device=edge_mix", RUN_DIR: ""}
    node_config = {PARTITION_ID: 1, NUM_PARTITIONS: 2, "threads": 1, "log-dir": str(tmp_path),
                   "device-profile": "phone_midrange"}
    torch.manual_seed(0)
    arrays = ArrayRecord(get_model("cnn_small", num_classes=10).state_dict())
    train = Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({SERVER_ROUND: 1, "lr": 0.05, "epochs": 1,
                                                                       "batch-size": 4})}), 11, "train")
    query = Message(RecordDict({CONFIG: ConfigRecord()}), 11, QUERY_PARTITION)
    before = torch.get_num_threads()
    try:
        reply = app(train, _context(node_config, run_config))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    answer = app(query, _context(node_config, run_config))
    assert not reply.has_error() and reply.content[METRICS]["num-examples"] > 0
    assert answer.content[METRICS][PARTITION_ID] == 1 and answer.content[METRICS][DELTA_TIER] == 2
    logged = [json.loads(line) for line in (tmp_path / MESSAGES_FILE).read_text().splitlines()]
    assert [e["type"] for e in logged] == ["train", QUERY_PARTITION]
    assert logged[0]["down_bytes"] == payload_bytes(train.content) and logged[0]["up_bytes"] == payload_bytes(reply.content)
    assert logged[0]["round"] == 1 and logged[0]["partition"] == 1


def test_num_partitions_sizes_a_run_that_leaves_num_clients_alone():
    """Flower's simulation (and a SuperNode's --node-config) sets num-partitions; a run config without
    num_clients (none at all: a stock ServerApp) takes it, one that sets it must agree with it."""
    run = device_run({}, DeviceSettings(partition_id=2, num_partitions=3))
    assert run.num_clients == 3 and run.client.data.num_clients == 3
    run = device_run({OVERRIDES: "data.samples_per_client=8 seed=4"}, DeviceSettings(num_partitions=1))
    assert run.client.data.num_clients == 1 and run.client.seed == 4  # min_fit_clients=2 is the server's concern
    assert device_run({OVERRIDES: TINY}, DeviceSettings(num_partitions=5)).num_clients == 2  # then device_mod refuses


def test_num_partitions_must_match_num_clients():
    with pytest.raises(ConfigError, match="num-partitions"):
        device_mod(Message(RecordDict({CONFIG: ConfigRecord()}), 11, QUERY_PARTITION),
                   _context({PARTITION_ID: 0, NUM_PARTITIONS: 5}, {OVERRIDES: TINY}), lambda m, c: None)


def test_server_app_writes_the_run_directory_on_the_inprocess_grid(tmp_path):
    """The deployed ServerApp's main with the deployed ClientApp, on the simulator's grid."""
    from clients.app import build_client_app
    from fl.deploy.server_app import app as server_app
    from fl.engine.inprocess import InProcessGrid

    run_config = {OVERRIDES: f"{TINY} rounds=2 tensorboard=false", RUN_DIR: str(tmp_path / "run")}

    def with_run_config(msg, context, call_next):  # what a SuperNode's context carries
        return call_next(msg, dataclasses.replace(context, run_config=run_config))

    grid = InProcessGrid(build_client_app(mods=[with_run_config, device_mod]), 2)
    try:
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    finally:
        grid.close()
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)
    assert summary["engine"] == "flwr-run" and summary["rounds"] == 2
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients"] == 2 for r in rows[1:])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "final_model.pt").is_file()


def test_server_app_refuses_resume(tmp_path):
    from clients.app import build_client_app
    from fl.deploy.server_app import app as server_app
    from fl.engine.inprocess import InProcessGrid

    grid = InProcessGrid(build_client_app(), 1)
    try:
        with pytest.raises(ConfigError, match="resume"):
            server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                     run_config={OVERRIDES: f"{TINY} resume={tmp_path}", RUN_DIR: str(tmp_path)}))
    finally:
        grid.close()


# -- real processes ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def _stop_family(name: str, family: list) -> list[str]:
    """SIGTERM every process of ``family``, SIGKILL those alive after 15 s; returns "name/pid" of those."""
    import psutil

    for member in family:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=15)
    for member in alive:
        member.kill()
    psutil.wait_procs(alive, timeout=5)
    return [f"{name}/{member.pid}" for member in alive]

class Processes:
    """Flower processes started by a test; ``stop`` ends each one and everything it spawned."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: dict[str, subprocess.Popen] = {}
        self.adopted: dict[str, object] = {}  # psutil.Process: started on our behalf (flwr's local SuperLink)

    def env(self, name: str) -> dict[str, str]:
        home = self.folder / "flwr-home" / name  # each process its own FLWR_HOME (apps, config)
        home.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env(name), cwd=self.folder)
        log.close()
        self.started[name] = proc
        return proc

    def adopt(self, name: str, marker: str) -> None:
        """Take charge of the ``flower-superlink`` whose command line holds ``marker`` (a path of ours)."""
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "flower-superlink" in cmdline and marker in cmdline:
                self.adopted[f"{name}-{proc.pid}"] = proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop(self) -> list[str]:
        """SIGTERM every process and its descendants, newest first; SIGKILL what is left after 15 s.
        Returns the names of those that had to be killed."""
        import psutil

        killed = []
        for name, proc in self.adopted.items():
            try:
                family = [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            killed += _stop_family(name, family)
        self.adopted.clear()
        for name, proc in reversed(list(self.started.items())):
            try:
                family = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
                    killed.append(name)
            killed += _stop_family(name, family)
        self.started.clear()
        return killed

    def tails(self, lines: int = 40) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in sorted(self.folder.glob("*.log")))


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()
        print(procs.tails())  # shown by pytest when the test failed


def wait_healthy(port: int, proc: subprocess.Popen, ca: Path | None = None, timeout: float = 120) -> None:
    import httpx

    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}/health"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"flower-superlink exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=1.0, verify=str(ca) if ca else True).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"SuperLink on port {port} not healthy within {timeout:.0f} s")


def start_superlink(processes: Processes, port: int, tls=None, auth: bool = False) -> subprocess.Popen:
    args = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
    if tls is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                 "--ssl-keyfile", str(tls.server_key)]
    if auth:
        args.append("--enable-supernode-auth")
    proc = processes.start("superlink", args)
    wait_healthy(port, proc, tls.ca_cert if tls else None)
    return proc


def start_supernode(processes: Processes, name: str, superlink: int, node_config: str, tls=None,
                    key: Path | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = ["flower-supernode", "--superlink", f"127.0.0.1:{superlink}",
            "--port", str(free_port()), "--node-config", node_config, *extra]
    args += ["--insecure"] if tls is None else ["--root-certificates", str(tls.ca_cert)]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    return processes.start(name, args)


def flwr_cli(processes: Processes, port: int | None, args: list[str], tls=None, timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``flwr <args>`` with one SuperLink connection, ``test``, in its own Flower config: the SuperLink
    on ``port``, or Flower's managed local simulation SuperLink when ``port`` is None."""
    env = {**processes.env("cli"), **(env or {})}
    if port is None:
        connection = 'address = ":local:"\n'
    else:
        connection = f'address = "127.0.0.1:{port}"\n' + (
            "insecure = true\n" if tls is None else f'root-certificates = "{tls.ca_cert}"\n')
    Path(env["FLWR_HOME"], "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n{connection}')
    return subprocess.run(["flwr", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_federation(processes: Processes, port: int | None, run_dir: Path, overrides: str, tls=None,
                   timeout: float = 540, extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
    run_config = f'{OVERRIDES}="{overrides}" {RUN_DIR}="{run_dir}"'
    done = flwr_cli(processes, port, ["run", str(ROOT), "test", "--run-config", run_config, *extra, "--stream"],
                    tls=tls, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (run_dir / "summary.json").is_file(), f"the run did not complete:\n{done.stdout[-3000:]}"


def device_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MESSAGES_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_two_supernodes_run_the_app_with_flwr_run(processes, tmp_path):
    port = free_port()
    start_superlink(processes, port)
    for partition in (0, 1):
        start_supernode(processes, f"supernode{partition}", port,
                        f'partition-id={partition} num-partitions=2 threads=1 log-dir="{tmp_path / f"device{partition}"}"')
    run_dir = tmp_path / "run"
    run_federation(processes, port, run_dir, f"{TINY} rounds=2")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["engine"] == "flwr-run" and summary["rounds"] == 2
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["failures"] == 0 and r["accuracy"] is not None for r in rows[1:])
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "config.yaml").is_file()
    assert "classifier.weight" in torch.load(run_dir / "final_model.pt")
    # The bytes the server metered are the bytes the devices counted, message for message.
    logs = [device_log(tmp_path / f"device{p}") for p in (0, 1)]
    for row in rows[1:]:
        train = [e for log in logs for e in log if e["type"] == "train" and e["round"] == row["round"]]
        assert len(train) == 2
        assert row["up_bytes"] == sum(e["up_bytes"] for e in train) > 0
        assert row["down_bytes"] == sum(e["down_bytes"] for e in train) > 0
    assert {e["partition"] for log in logs for e in log} == {0, 1}
    assert f"train round 2: down {logs[0][-1]['down_bytes']} B" in processes.log("supernode0")  # the device's console
    assert processes.stop() == []  # every process ended on SIGTERM


@pytest.mark.slow
def test_tls_with_supernode_authentication_refuses_unregistered_supernodes(processes, tmp_path):
    tls = make_tls(tmp_path / "certs", ["127.0.0.1"])
    keys = [make_node_keys(tmp_path / "keys", f"node{i}") for i in (0, 1)]
    stranger = make_node_keys(tmp_path / "keys", "stranger")
    port = free_port()
    start_superlink(processes, port, tls=tls, auth=True)
    registered = set()
    for k in keys:
        done = flwr_cli(processes, port, ["supernode", "register", str(k.public), "test", "--format", "json"], tls=tls)
        assert done.returncode == 0, done.stdout + done.stderr
        registered.add(str(json.loads(done.stdout)["node-id"]))

    # Refused: a key nobody registered, and no key at all (self-registration is off with auth).
    refused = [start_supernode(processes, "stranger", port, "partition-id=0 num-partitions=2", tls=tls,
                               key=stranger.private, extra=("--max-retries", "0")),
               start_supernode(processes, "keyless", port, "partition-id=1 num-partitions=2", tls=tls,
                               extra=("--max-retries", "0"))]
    for proc in refused:
        proc.wait(timeout=120)
        assert proc.returncode != 0
    for name, reason in (("stranger", "Failed to activate SuperNode"),
                         ("keyless", "All SuperNodes must be registered")):
        log = processes.log(name)
        assert "Failed to initialize the connection to the SuperLink" in log and reason in log, log[-2000:]

    # Admitted: the registered keys, over TLS; they run a round of the app.
    for i, k in enumerate(keys):
        start_supernode(processes, f"supernode{i}", port, f"partition-id={i} num-partitions=2 threads=1", tls=tls,
                        key=k.private)
    run_dir = tmp_path / "run"
    run_federation(processes, port, run_dir, f"{TINY} rounds=1 tensorboard=false", tls=tls)
    rows = read_metrics(run_dir)
    assert rows[-1]["round"] == 1 and rows[-1]["clients"] == 2
    listed = flwr_cli(processes, port, ["supernode", "list", "test", "--format", "json"], tls=tls)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    nodes = json.loads(listed.stdout)["nodes"]
    assert {n["node-id"] for n in nodes} == registered and all(n["status"] == "online" for n in nodes)
    assert processes.stop() == []


@pytest.mark.slow
def test_flwr_run_local_simulation(processes, tmp_path):
    """``flwr run . <connection>`` against Flower's managed local SuperLink (simulation runtime):
    the same app on virtual SuperNodes, which Flower gives partition-id and num-partitions."""
    env = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}  # use this environment; no `uv sync` per run
    run_dir = tmp_path / "run"
    try:
        run_federation(processes, None, run_dir, f"{TINY} rounds=2 tensorboard=false",
                       extra=("--federation-config", "num-supernodes=2"), env=env)
    finally:
        processes.adopt("local-superlink", str(tmp_path / "flwr-home" / "cli"))  # it outlives `flwr run`
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients"] == 2 for r in rows[1:])
    assert json.loads((run_dir / "summary.json").read_text())["engine"] == "flwr-run"
    assert processes.stop() == []
