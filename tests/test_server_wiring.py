"""Unit tests of the server's wiring (fl.server, fl.served), the plugin hook protocol (fl.hooks) and
the run logger (fl.run_logger), each piece alone; end-to-end runs reach them too, but only here does a
failure name the piece that broke."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Strategy

from fl.hooks import Plugin, Report, RunView
from fl.local_training import TrainHyper
from fl.message_keys import BATCH_SIZE, BN_STATS, EPOCHS, LR, MOMENTUM, WEIGHT_DECAY
from fl.run_logger import METRICS_FILE, RunLogger, image_path, read_metrics, truncate_metrics
from fl.served import ServedStrategy, served
from fl.server import PluginHooks, Progress, RunRounds, train_config


# -- fl.served: what the server asks of a strategy beyond Flower's -------------------------------

def test_a_plain_flower_strategy_is_served_with_neutral_answers():
    extras = served(FlowerFedAvg())
    assert extras.state_dict() == {} and extras.rejected(3) == []
    assert extras.evaluate_global(ArrayRecord(), None) is None  # the server evaluates the run's model
    extras.load_state_dict({})  # accepted, nothing to restore


def test_our_strategies_answer_for_themselves():
    from strategies import FedAvg

    strategy = FedAvg(seed=7)
    assert served(strategy) is strategy and isinstance(strategy, ServedStrategy)
    strategy.rejections[2] = ["partition 1: non-finite"]
    assert strategy.rejected(2) == ["partition 1: non-finite"] and strategy.rejected(1) == []
    state = strategy.state_dict()
    other = FedAvg(seed=0)
    other.load_state_dict(state)
    assert other.seed == 7


# -- fl.server.RunRounds: the strategy as the run drives it ----------------------------------------

class Recording(Strategy):
    """A Flower strategy that records the rounds it is called with and answers fixed metrics."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def summary(self):
        self.calls.append(("summary", 0))

    def configure_train(self, server_round, arrays, config, grid):
        self.calls.append(("configure_train", server_round))
        return []

    def aggregate_train(self, server_round, replies):
        self.calls.append(("aggregate_train", server_round))
        return ArrayRecord(), MetricRecord({"train_loss": 0.5})

    def configure_evaluate(self, server_round, arrays, config, grid):
        self.calls.append(("configure_evaluate", server_round))
        return []

    def aggregate_evaluate(self, server_round, replies):
        self.calls.append(("aggregate_evaluate", server_round))
        return MetricRecord({"client_accuracy": 0.25})


def test_run_rounds_numbers_rounds_on_from_a_checkpoint():
    inner = Recording()
    rounds = RunRounds(inner, offset=3)
    rounds.configure_train(1, ArrayRecord(), None, None)
    rounds.aggregate_train(1, [])
    rounds.configure_evaluate(2, ArrayRecord(), None, None)
    rounds.aggregate_evaluate(2, [])
    assert inner.calls == [("configure_train", 4), ("aggregate_train", 4), ("configure_evaluate", 5),
                           ("aggregate_evaluate", 5)]


def test_run_rounds_hands_the_round_metrics_to_the_row_once():
    rounds = RunRounds(Recording())
    rounds.aggregate_train(1, [])
    rounds.aggregate_evaluate(1, [])
    assert rounds.take_metrics() == {"train/train_loss": 0.5, "fed_eval/client_accuracy": 0.25}
    assert rounds.take_metrics() == {}  # the next round's row starts empty


def test_run_rounds_does_not_touch_the_strategy_it_wraps():
    inner = Recording()
    RunRounds(inner).aggregate_train(1, [])
    assert "aggregate_train" not in vars(inner)  # no monkey-patching: the method is the class's


def test_train_config_carries_every_hyper_parameter():
    hyper = TrainHyper(epochs=3, batch_size=8, lr=0.1, momentum=0.5, weight_decay=1e-4, bn_stats="local")
    config = train_config(hyper, {"extra": 1})
    assert dict(config) == {LR: 0.1, EPOCHS: 3, BATCH_SIZE: 8, MOMENTUM: 0.5, WEIGHT_DECAY: 1e-4,
                            BN_STATS: "local", "extra": 1}


# -- fl.server.PluginHooks and the hook protocol ----------------------------------------------------

class Tracing(Plugin):
    name = "tracing"

    def __init__(self, log: list):
        self.log = log

    def on_run_start(self, run):
        self.log.append(("start", 0))

    def before_round(self, run, server_round):
        self.log.append(("before", server_round))

    def after_aggregate(self, run, server_round, arrays):
        self.log.append(("aggregate", server_round))
        return Report(scalars={"norm": 2.0})

    def after_round(self, run, server_round, row):
        self.log.append(("round", server_round))
        return Report(scalars={"seen_accuracy": row["accuracy"]}, files={"notes.txt": f"round {server_round}"})

    def on_run_end(self, run):
        self.log.append(("end", run.num_rounds))


def _view(tmp_path, rounds=2) -> RunView:
    return RunView(run_dir=str(tmp_path), federation=None, build_model=lambda: None, load_global=lambda a: None,
                   num_rounds=rounds, initial_arrays=ArrayRecord())


def test_plugin_hooks_call_each_plugin_and_return_its_scalars_under_its_name(tmp_path):
    log: list = []
    logger = RunLogger(tmp_path, tensorboard=False)
    hooks = PluginHooks([Tracing(log)], _view(tmp_path), logger, rounds=2)
    hooks.run_start()
    hooks.before_round(1)
    assert hooks.after_aggregate(1, ArrayRecord()) == {"plugin/tracing/norm": 2.0}
    assert hooks.after_round(1, {"accuracy": 0.5}) == {"plugin/tracing/seen_accuracy": 0.5}
    hooks.before_round(3)  # past the last round: no hook
    hooks.run_end()
    logger.close()
    assert log == [("start", 0), ("before", 1), ("aggregate", 1), ("round", 1), ("end", 2)]
    assert (tmp_path / "notes.txt").read_text() == "round 1"


def test_a_plugin_refusing_the_run_at_start_is_a_config_error_naming_it(tmp_path):
    from fl.errors import ConfigError

    class Refusing(Plugin):
        name = "refusing"

        def on_run_start(self, run):
            raise ValueError("clients beyond num_clients")

    hooks = PluginHooks([Refusing()], _view(tmp_path), RunLogger(tmp_path, tensorboard=False), rounds=1)
    with pytest.raises(ConfigError, match=r"plugins\.refusing: clients beyond"):
        hooks.run_start()


def test_the_base_plugin_does_nothing_and_passes_the_payload_through():
    plugin, record = Plugin(), ArrayRecord([np.ones(2, dtype=np.float32)])
    assert plugin.on_payload(None, record) is record
    assert all(getattr(plugin, hook)(*args) is None for hook, args in [
        ("on_run_start", (None,)), ("before_round", (None, 1)), ("after_aggregate", (None, 1, record)),
        ("after_round", (None, 1, {})), ("on_run_end", (None,)), ("before_train", (None, None, None)),
        ("after_train", (None, None, {}))])


def test_progress_counts_on_from_the_rounds_already_done_with_seconds_per_round_and_time_left():
    progress = Progress(rounds=4, done=1, enabled=True)
    progress.advance(2**20, 0.5)
    assert progress.bar.n == 2 and progress.bar.postfix == "up_MiB=1.0, acc=0.500"
    # elapsed<time left, then the rate: s/round (round/s only for rounds shorter than a second)
    assert re.search(r"\[00:00<00:0\d, +\d+\.\d+(s/round|round/s)", str(progress.bar)), str(progress.bar)
    progress.close()


# -- fl.run_logger: metrics.jsonl, reports, truncation --------------------------------------------------

def test_the_run_logger_writes_one_json_row_per_round_with_non_finite_as_null(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log_round({"round": 0, "accuracy": 0.1, "loss": float("nan"), "clients": np.int64(3)})
    logger.log_round({"round": 1, "accuracy": np.float32(0.25), "loss": 2.0, "clients": 5})
    logger.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"round": 0, "accuracy": 0.1, "loss": None, "clients": 3},
                                                     {"round": 1, "accuracy": 0.25, "loss": 2.0, "clients": 5}]
    assert read_metrics(tmp_path) == [json.loads(line) for line in lines]


def test_truncation_keeps_the_rounds_a_resume_does_not_rewrite(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    for r in range(4):
        logger.log_round({"round": r})
    logger.close()
    truncate_metrics(tmp_path, 1)
    assert [row["round"] for row in read_metrics(tmp_path)] == [0, 1]


def test_a_report_file_must_be_a_plain_name_in_the_run_directory(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="plain name"):
        logger.log_report("p", Report(files={"../escape.txt": "x"}), 1)
    assert not (tmp_path.parent / "escape.txt").exists()
    logger.close()


def test_report_images_become_png_files_and_tensorboard_gets_the_scalars(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=True)
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    scalars = logger.log_report("p", Report(scalars={"a": 1}, images={"maps/x": image}), 2)
    logger.close()
    assert scalars == {"plugin/p/a": 1.0}
    assert image_path(tmp_path, "p", "maps/x", 2).exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert "plugin/p/a" in events.Tags()["scalars"]
