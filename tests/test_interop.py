"""Interoperability with Flower pieces this project did not write, each direction driven by a
minimal stock counterpart written here.

- Our ClientApp (``fl.deploy.client_app``) under a stock ``ServerApp`` running Flower's own
  ``flwr.serverapp.strategy.FedAvg``: data settings from the run/node config (any size, any number
  of partitions), training settings from the message, the CLI's defaults for what it omits, and
  replies that stock FedAvg aggregates.
- Our ServerApp (``fl.server.run_server``, the project's FedAvg) against a stock ``ClientApp`` with
  only ``@app.train()`` and ``@app.evaluate()``: the partition query it cannot answer falls back
  quietly and is never counted as a training failure.

The fast tests deliver the messages on the in-process grid (with its partition shortcut hidden, so
that the server asks as it does on any other grid); the ``slow`` ones run Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg as StockFedAvg

from clients.trainer import hyper_from
from fl.engine.inprocess import InProcessGrid
from fl.errors import ConfigError
from fl.local_training import TrainHyper
from fl.message_keys import QUERY_PARTITION
from fl.node_directory import NodeDirectory
from fl.run_logger import read_metrics
from fl.specs import ClientSpec
from tests.helpers import compose_config

SMALL_DATA = "data.samples_per_client=12 data.test_size=32 seed=3"  # not the shipped size or seed
NODES = 3  # not the shipped num_clients (100)


# -- one set of defaults ------------------------------------------------------------------------------

def test_client_fallbacks_are_the_cli_defaults():
    """sim_configs/config.yaml's train section, TrainHyper's defaults and what a client uses for a key
    the message omits are one set of numbers."""
    cli = compose_config([]).train
    assert dataclasses.asdict(TrainHyper()) == {k: cli[k] for k in ("epochs", "batch_size", "lr", "momentum",
                                                                     "weight_decay", "bn_stats")}
    assert hyper_from(ConfigRecord()) == TrainHyper()
    assert hyper_from(ConfigRecord({"lr": 0.2, "server-round": 1})) == dataclasses.replace(TrainHyper(), lr=0.2)


def test_plain_client_app_without_a_spec_names_the_app_to_run():
    with pytest.raises(ConfigError, match="fl.deploy.client_app:app"):
        ClientSpec.from_run_config({})


# -- a stock ServerApp + Flower's FedAvg driving our ClientApp ------------------------------------------

def _initial_arrays() -> ArrayRecord:
    from fl.models import get_model

    torch.manual_seed(0)
    return ArrayRecord(get_model("cnn_small", num_classes=10).state_dict())


def stock_server_app(nodes: int, result: dict) -> ServerApp:
    """What a Flower user writes: Flower's FedAvg, an lr in the train config, nothing else."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = StockFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=nodes,
                               min_train_nodes=nodes, min_evaluate_nodes=nodes)
        result["initial"] = _initial_arrays()
        result["result"] = strategy.start(grid=grid, initial_arrays=result["initial"], num_rounds=2,
                                          train_config=ConfigRecord({"lr": 0.05}))

    return app


def _check_stock_result(result: dict, nodes: int) -> None:
    outcome = result["result"]
    assert sorted(outcome.train_metrics_clientapp) == [1, 2] and sorted(outcome.evaluate_metrics_clientapp) == [1, 2]
    for metrics in [*outcome.train_metrics_clientapp.values(), *outcome.evaluate_metrics_clientapp.values()]:
        assert all(math.isfinite(float(v)) for v in metrics.values())
    assert math.isfinite(outcome.evaluate_metrics_clientapp[2]["loss"])
    final = outcome.arrays.to_numpy_ndarrays()
    initial = result["initial"].to_numpy_ndarrays()
    assert [a.shape for a in final] == [a.shape for a in initial]
    assert all(np.isfinite(a).all() for a in final if a.dtype.kind == "f")
    assert any(not np.array_equal(a, b) for a, b in zip(final, initial))  # the aggregate moved the model


def test_our_client_app_under_a_stock_fedavg_server():
    """Flower's FedAvg.start on the in-process grid (node i holds partition i of NODES, as Flower's
    simulation says in each node config) with our ClientApp, sized by num-partitions alone."""
    from fl.deploy.client_app import client_app

    result: dict = {}
    grid = AnyGrid(InProcessGrid(client_app(SMALL_DATA), NODES))
    try:
        stock_server_app(NODES, result)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                       run_config={}))
    finally:
        grid.inner.close()
    _check_stock_result(result, NODES)
    assert grid.sent_types.count("train") == 2 * NODES and not any(r.has_error() for r in grid.replies)
    for reply in (r for r in grid.replies if r.metadata.message_type == "train"):
        kinds = [type(v) for v in reply.content.values()]  # what Flower's FedAvg aggregates
        assert kinds.count(ArrayRecord) == 1 and kinds.count(MetricRecord) == 1
        assert reply.content["metrics"]["num-examples"] == 12  # samples_per_client of a 3-way split


@pytest.mark.slow
def test_our_client_app_under_a_stock_server_on_flowers_simulation(capfd):
    """The same pair under flwr.simulation.run_simulation (Ray): no ClientApp error, no traceback."""
    from flwr.simulation import run_simulation

    from fl.deploy.client_app import client_app

    result: dict = {}
    run_simulation(stock_server_app(NODES, result), client_app(SMALL_DATA), num_supernodes=NODES,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"log_to_driver": False, "logging_level": "ERROR"}})
    _check_stock_result(result, NODES)
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err


# -- our ServerApp driving a stock ClientApp -------------------------------------------------------------

def stock_client_app() -> ClientApp:
    """What a Flower user writes: train and evaluate handlers, no query handler (numpy only)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        shrunk = {k: Array(a.numpy() * np.asarray(0.99, a.numpy().dtype) if a.numpy().dtype.kind == "f" else a.numpy())
                  for k, a in arrays.items()}
        return Message(RecordDict({"arrays": ArrayRecord(shrunk), "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, "accuracy": 0.5})}), reply_to=msg)

    return app


class AnyGrid(Grid):
    """The in-process grid without its partition shortcut: the server must ask, as on any other grid."""

    def __init__(self, inner: InProcessGrid):
        self.inner = inner
        self.sent_types: list[str] = []
        self.replies: list[Message] = []

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.sent_types += [m.metadata.message_type for m in messages]
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.sent_types += [m.metadata.message_type for m in messages]
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.replies += replies
        return replies


def _server_spec(run_dir: Path, nodes: int, *overrides: str):
    from fl.config import build

    cfg = compose_config([f"num_clients={nodes}", "fraction_fit=1.0", "rounds=2", "progress=false",
                          "tensorboard=false", "checkpoint_every=0", "data.samples_per_client=16",
                          "data.test_size=64", *overrides])
    spec, _, _ = build(cfg, str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    return spec


def _check_clean_run(run_dir: Path, nodes: int) -> None:
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["failures"] == 0 for r in rows)  # before: the failed partition queries were counted here
    assert all(r["clients"] == nodes and r["rejected"] == 0 for r in rows[1:])
    assert all(math.isfinite(r["loss"]) for r in rows)


def _serve_stock_client_apps(run_dir: Path, nodes: int, caplog, *overrides: str):
    """Our server over ``nodes`` stock ClientApps on a grid that must ask them (``AnyGrid``)."""
    from fl.server import run_server

    spec = _server_spec(run_dir, nodes, *overrides)
    grid = AnyGrid(InProcessGrid(stock_client_app(), nodes))
    try:
        with caplog.at_level(logging.INFO):
            outcome = run_server(grid, spec, [])
    finally:
        grid.inner.close()
    _check_clean_run(run_dir, nodes)
    return grid, outcome


def test_our_server_with_a_stock_client_app(tmp_path, caplog):
    grid, outcome = _serve_stock_client_apps(tmp_path / "run", 4, caplog)
    assert grid.sent_types.count(QUERY_PARTITION) == 1  # the first node's error spares the others the query
    assert outcome.control_bytes > 0
    assert "Traceback" not in caplog.text
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("fl", "strategies", "clients")]
    assert not any(r.levelno >= logging.WARNING for r in ours), [r.getMessage() for r in ours]
    assert "4 of 4 nodes reported no partition (their ClientApp has no partition query handler)" in caplog.text


def test_with_partition_query_off_a_stock_client_app_is_never_asked(tmp_path, caplog):
    grid, outcome = _serve_stock_client_apps(tmp_path / "run", 3, caplog, "partition_query=false")
    assert QUERY_PARTITION not in grid.sent_types and outcome.control_bytes == 0
    assert "reported no partition" not in caplog.text


@pytest.mark.slow
def test_our_server_with_a_stock_client_app_on_flowers_simulation_and_no_query(tmp_path, capfd):
    """With ``partition_query=false`` the stock ClientApp gets only train messages: no traceback at all."""
    from fl.engine.ray_sim import run_on_ray
    from fl.server import RunOutcome, build_server_app

    run_dir = tmp_path / "run"
    spec = _server_spec(run_dir, 4, "partition_query=false")
    outcome = RunOutcome()
    run_on_ray(build_server_app(spec, [], outcome), stock_client_app(), 4)
    assert outcome.error is None
    _check_clean_run(run_dir, 4)
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err


@pytest.mark.slow
def test_our_server_with_a_stock_client_app_on_flowers_simulation(tmp_path, capfd, caplog):
    """On Flower's engine the stock ClientApp raises on the one query it gets; Flower's engine logs that
    with a traceback, which the directory holds back and replaces with its one line: no traceback at
    all, a clean run, and no failure in its metrics."""
    from fl.engine.ray_sim import run_on_ray
    from fl.server import RunOutcome, build_server_app

    run_dir = tmp_path / "run"
    spec = _server_spec(run_dir, 4)
    outcome = RunOutcome()
    with caplog.at_level(logging.INFO):
        run_on_ray(build_server_app(spec, [], outcome), stock_client_app(), 4)
    assert outcome.error is None
    _check_clean_run(run_dir, 4)
    out = capfd.readouterr()
    logged = out.out + out.err + caplog.text
    assert "Traceback" not in logged and "No query function" not in logged
    assert "No train function" not in logged and "No evaluate function" not in logged
    assert "4 of 4 nodes reported no partition (their ClientApp has no partition query handler)" in caplog.text


def test_flowers_errors_are_held_back_only_when_the_block_drops_them(caplog):
    """The first node's query: Flower's error records are dropped when they are the stock ClientApp's
    missing handler, and logged as they came otherwise (a real failure stays visible)."""
    from fl.node_directory import flower_errors_held

    flower = logging.getLogger("flwr")
    with caplog.at_level(logging.INFO, logger="flwr"):
        with flower_errors_held() as held:
            flower.error("No query function registered with name 'partition'")
            flower.info("an info line passes at once")
            assert [r.getMessage() for r in caplog.records] == ["an info line passes at once"]
            held.clear()
        with flower_errors_held():
            flower.error("ClientApp raised: division by zero")
    assert [r.getMessage() for r in caplog.records] == ["an info line passes at once",
                                                         "ClientApp raised: division by zero"]
    assert not flower.filters


# -- the directory's fallback, on a scripted grid ----------------------------------------------------------

class ScriptedGrid(AnyGrid):
    """Replies to the partition query from a script: node -> partition, or an error reason."""

    def __init__(self, script: dict[int, int | str]):
        self.script = script
        self.sent_types, self.replies = [], []
        self.asked: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.script)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.asked.append(node)
            answer = self.script[node]
            if isinstance(answer, str):
                reply = Message(Error(code=0, reason=answer), reply_to=message)
            else:
                reply = Message(RecordDict({"metrics": MetricRecord({"partition-id": answer})}), reply_to=message)
            replies.append(reply)
        return replies


def test_directory_falls_back_to_node_order_for_nodes_that_cannot_answer():
    stock = "ValueError: No query function registered with name 'partition'"
    grid = ScriptedGrid({5: stock, 7: stock, 9: stock})
    assert NodeDirectory.discover(grid).node_of_partition == {0: 5, 1: 7, 2: 9}
    assert grid.asked == [5]  # a ClientApp without the handler: nobody else is asked
    grid = ScriptedGrid({5: "RuntimeError: disk full", 7: 0, 9: 1})
    assert NodeDirectory.discover(grid).node_of_partition == {0: 7, 1: 9, 2: 5}  # some other error: ask the rest
    assert grid.asked == [5, 7, 9]
    grid = ScriptedGrid({5: 1, 7: 0, 9: 2})
    assert NodeDirectory.discover(grid, ask=False).node_of_partition == {0: 5, 1: 7, 2: 9}  # partition_query=false
    assert grid.asked == []


# -- flwr run: a Flower app of someone else's, with our ClientApp as its clientapp ---------------------------

STOCK_APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "stock-server"
version = "1.0.0"
dependencies = ["flwr[simulation]==1.41.0"]

[tool.flwr.app]
publisher = "someone-else"

[tool.flwr.app.components]
serverapp = "stock_server:app"
clientapp = "fl.deploy.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 2
overrides = "data.samples_per_client=12 data.test_size=32 seed=3"
result-file = ""
"""

STOCK_SERVER = '''\
import json
import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fl.models import get_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(0)
    initial = ArrayRecord(get_model("cnn_small", num_classes=10).state_dict())
    result = FedAvg(fraction_evaluate=1.0).start(grid=grid, initial_arrays=initial,
                                                 num_rounds=int(context.run_config["num-server-rounds"]),
                                                 train_config=ConfigRecord({"lr": 0.05}))
    with open(context.run_config["result-file"], "w") as f:
        json.dump({"train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
                   "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}}, f)
'''


@pytest.mark.slow
def test_our_client_app_under_a_stock_server_with_flwr_run(tmp_path):
    """``flwr run <someone else's app> local-simulation``: their ServerApp (Flower's FedAvg), our
    ClientApp named as their clientapp, three virtual SuperNodes (Flower gives each partition-id and
    num-partitions=3), the data settings in their run config's ``overrides``."""
    import os

    from tests.test_deploy import ROOT, Processes, flwr_cli, free_port

    app_dir = tmp_path / "stock_app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(STOCK_APP_PYPROJECT)
    (app_dir / "stock_server.py").write_text(STOCK_SERVER)
    result_file = tmp_path / "result.json"
    env = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # use this environment; no `uv sync` per run
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # our packages
    processes = Processes(tmp_path)
    try:
        done = flwr_cli(processes, None, ["run", str(app_dir), "test", "--run-config", f'result-file="{result_file}"',
                                          "--federation-config", "num-supernodes=3", "--stream"], timeout=540, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        processes.adopt("local-superlink", str(tmp_path / "flwr-home" / "cli"))  # it outlives `flwr run`
        processes.stop()
    result = json.loads(result_file.read_text())
    assert sorted(result["train"]) == ["1", "2"] and sorted(result["evaluate"]) == ["1", "2"]
    assert all(math.isfinite(v) for m in [*result["train"].values(), *result["evaluate"].values()] for v in m.values())
    assert "Traceback" not in done.stdout + done.stderr
