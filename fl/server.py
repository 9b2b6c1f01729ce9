"""The ServerApp: builds the strategy and drives Flower's ``Strategy.start`` round loop.

``Strategy.start`` owns the loop (STYLE rule 2). This module fills the two places Flower leaves
open: the Grid (wrapped in ``MeteredGrid`` to count bytes) and ``evaluate_fn``, which Flower
calls before round 1 and after every round. ``RoundReporter`` is that callback: it evaluates the
global model centrally, closes the round's traffic, calls the plugins' server hooks and writes
the round's row through the run logger.

Stopping and resuming: ``StopRequest`` turns SIGTERM and SIGINT into a stop at a clean point (the
round in progress finishes, is logged and checkpointed, then ``RunStopped`` ends the run); a second
signal stops at once, at the last checkpoint. A resumed run rewrites ``metrics.jsonl`` from the
checkpoint's rows (a killed run may have logged later rounds or torn its last line), and one whose
checkpoint is its last round only runs the plugins' ``on_run_end`` (``finish_only``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from tqdm import tqdm

from fl.checkpoint import Checkpoint, kill_point, save_checkpoint
from fl.clock import ClockSpec
from fl.engine.metered import MeteredGrid
from fl.errors import ConfigError
from fl.hooks import Plugin, RunView
from fl.keys import BATCH_SIZE, BN_STATS, EPOCHS, LR, MOMENTUM, WEIGHT_DECAY
from fl.local_training import ClientData, TrainHyper, evaluate
from fl.runlog import METRICS_FILE, RunLogger
from fl.specs import ClientSpec


@dataclass
class ServerSpec:
    """Everything the ServerApp needs, typed (built from the Hydra config by ``fl.config``)."""

    client: ClientSpec
    make_strategy: Callable[[], Strategy]
    rounds: int
    train: TrainHyper
    run_dir: str
    eval_every: int = 1
    round_timeout: float = 3600.0
    eval_threads: int = 0  # torch threads for central evaluation; 0 = all cores
    checkpoint_every: int = 0  # write checkpoint.pt every k rounds (and after the last); 0 = never
    keep_checkpoint: bool = False  # keep checkpoint.pt once a run's final outputs are written (fl.simulate)
    clock: ClockSpec | None = None  # virtual device clock (fl.clock); None = untimed
    tensorboard: bool = True
    progress: bool = True
    extra_train_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunOutcome:
    final_arrays: ArrayRecord | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    control_bytes: int = 0  # one-time node discovery queries (see fl.engine.metered)
    error: BaseException | None = None


class RunStopped(BaseException):
    """The run stopped on a signal; ``round`` is its last checkpointed round (0: none).

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way may take it
    for a failure."""

    def __init__(self, round: int, signum: int):
        super().__init__(f"stopped at round {round}")
        self.round, self.signum = round, signum


class StopRequest:
    """SIGTERM/SIGINT handlers for the duration of a run (installed by ``fl.simulate``).

    The first signal is only recorded: the reporter checks it after each round, checkpoints that
    round and raises ``RunStopped``. A second one raises ``RunStopped`` at once, at the last
    checkpoint (a round in progress is lost; its partial writes are repaired by the resume)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.checkpointed = 0  # the last round whose checkpoint is in place

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """The handlers, for the duration of the ``with`` block (the previous ones come back after)."""
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            return
        raise RunStopped(self.checkpointed, signum)


def train_config(hyper: TrainHyper, extra: dict[str, Any]) -> ConfigRecord:
    return ConfigRecord({LR: hyper.lr, EPOCHS: hyper.epochs, BATCH_SIZE: hyper.batch_size,
                         MOMENTUM: hyper.momentum, WEIGHT_DECAY: hyper.weight_decay, BN_STATS: hyper.bn_stats, **extra})


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class RoundReporter:
    """Flower's ``evaluate_fn``: called with round 0 before training and after every round."""

    def __init__(self, spec: ServerSpec, grid: MeteredGrid, logger: RunLogger, plugins: list[Plugin], view: RunView,
                 checkpoint: Callable[[int, ArrayRecord], None] | None = None, resumed: dict[str, Any] | None = None,
                 stop: StopRequest | None = None):
        self.spec, self.grid, self.logger, self.plugins, self.view = spec, grid, logger, plugins, view
        self.checkpoint, self.stop = checkpoint, stop
        self.rejections: dict[int, list[str]] = {}  # the strategy's record of rejected updates, if it keeps one
        # A strategy may evaluate its own global model: evaluate_global(arrays, test_data) -> {"accuracy", "loss", ...}
        self.evaluate_global: Callable[[ArrayRecord, ClientData], dict[str, float]] | None = None
        federation = spec.client.data.federation()
        self.test_data = ClientData(federation.test, np.arange(len(federation.test)))
        self.model = view.build_model()
        self.cum_up = 0
        self.cum_down = 0
        self.cum_sim_s = 0.0
        self.started = time.time()
        self.train_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self.rows: list[dict[str, Any]] = []
        self.offset = 0  # rounds already done before this process (a resumed run)
        self.initial: tuple[ArrayRecord, Any, float] | None = None  # round 0, reported after round 1
        if resumed is not None:
            self.cum_up, self.cum_down, self.rows = resumed["cum_up"], resumed["cum_down"], list(resumed["rows"])
            self.cum_sim_s = resumed.get("cum_sim_s", 0.0)
            self.offset = int(resumed["round"])
            self.started -= float(resumed["wall_s"])
        self.checkpointed = self.offset  # the last round whose checkpoint is in place
        self.bar = tqdm(total=spec.rounds, initial=self.offset, desc="rounds", unit="round", disable=not spec.progress,
                        dynamic_ncols=True)

    def state(self, server_round: int) -> dict[str, Any]:
        return {"round": server_round, "cum_up": self.cum_up, "cum_down": self.cum_down, "rows": self.rows,
                "cum_sim_s": self.cum_sim_s, "control_bytes": self.grid.control_bytes,
                "wall_s": time.time() - self.started}

    def record_train(self, aggregate):
        def wrapped(server_round, replies):
            kill_point(f"aggregate:{server_round}")  # test hook: mid-round, replies in hand (absolute round)
            arrays, metrics = aggregate(server_round, replies)
            self.train_metrics = dict(metrics or {})
            return arrays, metrics
        return wrapped

    def record_evaluate(self, aggregate):
        def wrapped(server_round, replies):
            metrics = aggregate(server_round, replies)
            self.eval_metrics = dict(metrics or {})
            return metrics
        return wrapped

    def __call__(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + self.offset
        if flower_round == 0:
            traffic = self.grid.close_round()  # round 0 has sent nothing (discovery is control traffic)
            if self.offset == 0:
                # The initial model is evaluated and logged after round 1's replies are in, so that the
                # first clients start training at once (the row is the same; only its timing moves).
                self.initial = (arrays, traffic, round(time.time() - self.started, 4))  # strategies never mutate it
            self._before_round(server_round + 1)
            return None
        if self.initial is not None:
            self._report(0, *self.initial)
            self.initial = None
        return self._report(server_round, arrays, self.grid.close_round())

    def _report(self, server_round: int, arrays: ArrayRecord, traffic: Any, wall_s: float | None = None) -> MetricRecord | None:
        plugin_scalars: dict[str, float] = {}
        if server_round > 0:
            for plugin in self.plugins:
                plugin_scalars.update(self.logger.log_report(plugin.name, plugin.after_aggregate(self.view, server_round, arrays), server_round))
        self.cum_up += traffic.up_bytes
        self.cum_down += traffic.down_bytes
        self.cum_sim_s += traffic.sim_s
        evaluated = server_round == 0 or server_round == self.spec.rounds or (
            self.spec.eval_every > 0 and server_round % self.spec.eval_every == 0)
        accuracy = loss = None
        extra_eval: dict[str, float] = {}
        if evaluated:
            with torch_threads(self.spec.eval_threads):
                if self.evaluate_global is not None:  # a strategy whose global model is not the run's model
                    result = dict(self.evaluate_global(arrays, self.test_data))
                else:
                    self.model.load_state_dict(arrays.to_torch_state_dict())
                    result = evaluate(self.model, self.test_data)
            accuracy, loss = result.pop("accuracy"), result.pop("loss")
            extra_eval = {f"eval/{k}": v for k, v in result.items()}
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "up_bytes": traffic.up_bytes,
            "down_bytes": traffic.down_bytes,
            "cum_up_bytes": self.cum_up,
            "cum_down_bytes": self.cum_down,
            "clients": traffic.clients,
            "failures": traffic.failures,
            "rejected": len(self.rejections.get(server_round, [])),
            "stragglers": traffic.stragglers,
            "wall_s": round(time.time() - self.started, 4) if wall_s is None else wall_s,
        }
        if self.spec.clock is not None:
            row["sim_s"] = traffic.sim_s
            row["cum_sim_s"] = self.cum_sim_s
        row.update(extra_eval)
        if server_round > 0:  # the deferred round-0 row must not take round 1's client metrics
            row.update({f"train/{k}": v for k, v in self.train_metrics.items()})
            row.update({f"fed_eval/{k}": v for k, v in self.eval_metrics.items()})
            self.train_metrics, self.eval_metrics = {}, {}
        for plugin in self.plugins:
            plugin_scalars.update(self.logger.log_report(plugin.name, plugin.after_round(self.view, server_round, row), server_round))
        row.update(plugin_scalars)
        self.logger.log_round(row, traffic.per_client_up)
        self.rows.append(row)
        kill_point(f"logged:{server_round}")  # test hook: the row is in metrics.jsonl, its checkpoint is not
        if server_round > 0:
            self.bar.update(1)
            postfix = {"up_MiB": f"{self.cum_up / 2**20:.1f}"}
            if accuracy is not None:
                postfix["acc"] = f"{accuracy:.3f}"
            self.bar.set_postfix(postfix)
        every = self.spec.checkpoint_every
        stopping = self.stop is not None and self.stop.signum is not None and server_round > 0
        if self.checkpoint is not None and server_round > 0 and (stopping or every > 0 and (
                server_round % every == 0 or server_round == self.spec.rounds)):
            self.checkpoint(server_round, arrays)
            self.checkpointed = server_round
            if self.stop is not None:
                self.stop.checkpointed = server_round
            kill_point(f"checkpointed:{server_round}")  # test hook: the round's checkpoint is in place
        if stopping:
            raise RunStopped(self.checkpointed, self.stop.signum)
        if server_round > 0:  # round 1's hooks ran before it started
            self._before_round(server_round + 1)
        return MetricRecord({"accuracy": accuracy, "loss": loss}) if evaluated else None

    def _before_round(self, server_round: int) -> None:
        if server_round <= self.spec.rounds:
            for plugin in self.plugins:
                self.logger.log_report(plugin.name, plugin.before_round(self.view, server_round), server_round)


def run_server(grid: Grid | None, spec: ServerSpec, plugins: list[Plugin], resume: Checkpoint | None = None,
               stop: StopRequest | None = None) -> RunOutcome:
    """Everything a ServerApp main does; returns the final global model and the logged rows.

    With a checkpoint of the last round (``finish_only(spec, resume)``) no round is left: no grid is
    needed, and only the plugins' ``on_run_end`` runs before the outcome is returned."""
    torch.manual_seed(spec.client.seed)
    federation = spec.client.data.federation()
    build_model = lambda: spec.client.model.build_for(federation)  # noqa: E731

    def load_global(arrays: ArrayRecord) -> torch.nn.Module:
        model = build_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        return model

    initial = ArrayRecord(build_model().state_dict())  # seeded: every strategy starts here
    metered = MeteredGrid(grid, spec.clock, spec.client.data.num_clients)
    strategy = spec.make_strategy()
    done_rounds = 0
    if resume is not None:
        done_rounds = resume.round
        initial = ArrayRecord(resume.arrays)
        if hasattr(strategy, "load_state_dict"):
            strategy.load_state_dict(resume.strategy)
        if hasattr(metered, "restore_node_states"):
            metered.restore_node_states(resume.node_states)
        restore_metrics(spec.run_dir, resume.reporter["rows"])
        if stop is not None:
            stop.checkpointed = done_rounds
    logger = RunLogger(spec.run_dir, tensorboard=spec.tensorboard, purge_step=done_rounds + 1 if resume else None)
    view = RunView(run_dir=spec.run_dir, federation=federation, build_model=build_model,
                   load_global=load_global, num_rounds=spec.rounds, initial_arrays=initial)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        node_states = metered.node_states() if hasattr(metered, "node_states") else {}
        state = strategy.state_dict() if hasattr(strategy, "state_dict") else {}
        save_checkpoint(spec.run_dir, Checkpoint(server_round, arrays.to_torch_state_dict(), state,
                                                 reporter.state(server_round), node_states))

    reporter = RoundReporter(spec, metered, logger, plugins, view, checkpoint,
                             resume.reporter if resume is not None else None, stop)
    reporter.rejections = getattr(strategy, "rejections", {})
    reporter.evaluate_global = getattr(strategy, "evaluate_global", None)
    strategy.aggregate_train = reporter.record_train(strategy.aggregate_train)
    strategy.aggregate_evaluate = reporter.record_evaluate(strategy.aggregate_evaluate)
    runner = strategy if done_rounds == 0 else ResumedRounds(strategy, done_rounds)
    try:
        if resume is None:
            for plugin in plugins:
                logger.log_report(plugin.name, _run_start(plugin, view), 0)
        final = initial
        if done_rounds < spec.rounds:
            result = runner.start(grid=metered, initial_arrays=initial, num_rounds=spec.rounds - done_rounds,
                                  timeout=spec.round_timeout,
                                  train_config=train_config(spec.train, spec.extra_train_config), evaluate_fn=reporter)
            final = result.arrays if len(result.arrays) else initial
        for plugin in plugins:
            logger.log_report(plugin.name, plugin.on_run_end(view), spec.rounds)
    finally:
        reporter.bar.close()
        logger.close()
    control_bytes = metered.control_bytes
    if finish_only(spec, resume):  # no engine ran: the control traffic is the killed run's
        control_bytes = int(resume.reporter.get("control_bytes", 0))
    return RunOutcome(final_arrays=final, rows=reporter.rows, control_bytes=control_bytes)


def _run_start(plugin: Plugin, view: RunView):
    """``on_run_start``: the plugin's check of the run before round 1; a ValueError there is a bad
    option (e.g. geometry's clients beyond num_clients): a ConfigError naming the plugin."""
    try:
        return plugin.on_run_start(view)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"plugins.{plugin.name}", str(exc)) from None


def finish_only(spec: ServerSpec, resume: Checkpoint | None) -> bool:
    """Whether ``resume`` holds the run's last round: only the end of the run is left to do."""
    return resume is not None and resume.round >= spec.rounds


def restore_metrics(run_dir: str, rows: list[dict[str, Any]]) -> None:
    """Make ``metrics.jsonl`` exactly the checkpoint's rows, written as the run logger writes them,
    atomically (a killed run may have logged later rounds, or torn its last line)."""
    scratch = Path(run_dir) / ".metrics-restore"
    shutil.rmtree(scratch, ignore_errors=True)
    logger = RunLogger(scratch, tensorboard=False)
    try:
        for row in rows:
            logger.log_round(row)
    finally:
        logger.close()
    os.replace(scratch / METRICS_FILE, Path(run_dir) / METRICS_FILE)
    shutil.rmtree(scratch, ignore_errors=True)


class ResumedRounds(Strategy):
    """``inner`` continued after ``offset`` finished rounds: Flower's ``start`` counts from round 1."""

    def __init__(self, inner: Strategy, offset: int):
        self.inner, self.offset = inner, offset

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


def build_server_app(spec: ServerSpec, plugins: list[Plugin], outcome: RunOutcome,
                     resume: Checkpoint | None = None, stop: StopRequest | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            done = run_server(grid, spec, plugins, resume, stop)
            outcome.final_arrays, outcome.rows, outcome.control_bytes = done.final_arrays, done.rows, done.control_bytes
        except BaseException as exc:  # surfaced by fl.run after the engine returns
            outcome.error = exc
            raise

    return app
