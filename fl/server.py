"""The ServerApp: builds the strategy and drives Flower's ``Strategy.start`` round loop.

``Strategy.start`` owns the loop. This module fills the places Flower leaves open,
each job in one home:

    MeteredGrid        the Grid, counting every message's bytes (``fl.engine.metered``)
    RunRounds          the strategy as the run drives it: rounds numbered on from a checkpoint,
                       the round's aggregated client metrics kept for its row
    RoundReporter      Flower's ``evaluate_fn`` (before round 1 and after every round): the round's row
    CentralEvaluation  the global model on the central test set
    PluginHooks        the plugins' server hooks
    RunLogger          metrics.jsonl and TensorBoard (``fl.run_logger``)
    Progress           the progress bar
    checkpoint()       ``checkpoint.pt`` (``fl.checkpoint``)

What the server asks of a strategy beyond Flower's ``Strategy`` (its state, its rejected updates,
its own evaluation) is ``fl.served.ServedStrategy``; a plain Flower strategy gets neutral answers.

Stopping and resuming: ``StopRequest`` turns SIGTERM and SIGINT into a stop at a clean point (the
round in progress finishes, is logged and checkpointed, then ``RunStopped`` ends the run); a second
signal stops at once, at the last checkpoint. A resumed run rewrites ``metrics.jsonl`` from the
checkpoint's rows (a killed run may have logged later rounds or torn its last line), and one whose
checkpoint is its last round only runs the plugins' ``on_run_end`` (``finish_only``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
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
from fl.compute import resolve_compute
from fl.engine.metered import MeteredGrid
from fl.errors import ConfigError
from fl.hooks import Plugin, RunView
from fl.local_training import ClientData, TrainHyper, evaluate
from fl.message_keys import BATCH_SIZE, BN_STATS, EPOCHS, LR, MOMENTUM, WEIGHT_DECAY
from fl.run_logger import METRICS_FILE, RunLogger
from fl.served import ServedStrategy, served
from fl.specs import ClientSpec

log = logging.getLogger(__name__)


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


class CentralEvaluation:
    """The global model on the central test set: before round 1, after the last round and every
    ``eval_every`` rounds, by the strategy's own ``evaluate_global`` or else by the run's model, on
    the run's compute device (the received CPU weights are copied onto it)."""

    def __init__(self, spec: ServerSpec, view: RunView, strategy: ServedStrategy):
        federation = spec.client.data.federation()
        self.test_data = ClientData(federation.test, np.arange(len(federation.test)))
        self.model = view.build_model().to(view.device)
        self.strategy, self.every, self.rounds, self.threads = strategy, spec.eval_every, spec.rounds, spec.eval_threads

    def due(self, server_round: int) -> bool:
        return server_round in (0, self.rounds) or (self.every > 0 and server_round % self.every == 0)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        with torch_threads(self.threads):
            result = self.strategy.evaluate_global(arrays, self.test_data)
            if result is None:
                self.model.load_state_dict(arrays.to_torch_state_dict())
                result = evaluate(self.model, self.test_data)
        return dict(result)


class PluginHooks:
    """The plugins' server-side hooks (``fl.hooks.Plugin``), each report written by the run logger;
    the ``after_*`` hooks return the scalars their reports put in the round's row."""

    def __init__(self, plugins: list[Plugin], view: RunView, logger: RunLogger, rounds: int):
        self.plugins, self.view, self.logger, self.rounds = plugins, view, logger, rounds

    def run_start(self) -> None:
        for plugin in self.plugins:
            self.logger.log_report(plugin.name, _run_start(plugin, self.view), 0)

    def before_round(self, server_round: int) -> None:
        if server_round <= self.rounds:
            for plugin in self.plugins:
                self.logger.log_report(plugin.name, plugin.before_round(self.view, server_round), server_round)

    def after_aggregate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        scalars: dict[str, float] = {}
        for plugin in self.plugins:
            scalars.update(self.logger.log_report(plugin.name, plugin.after_aggregate(self.view, server_round, arrays),
                                                  server_round))
        return scalars

    def after_round(self, server_round: int, row: dict[str, Any]) -> dict[str, float]:
        scalars: dict[str, float] = {}
        for plugin in self.plugins:
            scalars.update(self.logger.log_report(plugin.name, plugin.after_round(self.view, server_round, row), server_round))
        return scalars

    def run_end(self) -> None:
        for plugin in self.plugins:
            self.logger.log_report(plugin.name, plugin.on_run_end(self.view), self.rounds)


class Progress:
    """The rounds progress bar (tqdm), with the upload so far and the last accuracy."""

    def __init__(self, rounds: int, done: int, enabled: bool):
        self.bar = tqdm(total=rounds, initial=done, desc="rounds", unit="round", disable=not enabled, dynamic_ncols=True)

    def advance(self, cum_up: int, accuracy: float | None) -> None:
        self.bar.update(1)
        postfix = {"up_MiB": f"{cum_up / 2**20:.1f}"}
        if accuracy is not None:
            postfix["acc"] = f"{accuracy:.3f}"
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()


class RunRounds(Strategy):
    """The strategy as the run drives it: rounds numbered on from a checkpoint (Flower's ``start``
    counts from 1) and the round's aggregated client metrics kept for its row."""

    def __init__(self, inner: Strategy, offset: int = 0):
        self.inner, self.offset = inner, offset
        self._unwatch: Callable[[], None] | None = None
        self.train_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}

    def summary(self) -> None:  # Flower's ``start`` names this wrapper's class first
        log.info("\t%s%s", type(self.inner).__name__, f", resumed after round {self.offset}" if self.offset else "")
        self.inner.summary()

    def configure_train(self, server_round, arrays, config, grid):
        messages = self.inner.configure_train(server_round + self.offset, arrays, config, grid)
        prescreen = getattr(self.inner, "prescreen", None)
        watch = getattr(grid, "watch_replies", None)
        if prescreen is not None and watch is not None:
            # the in-process engine hands each reply to the strategy's screening as it arrives
            watch(functools.partial(prescreen, server_round + self.offset))
            self._unwatch = functools.partial(watch, None)
        return messages

    def aggregate_train(self, server_round, replies):
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        kill_point(f"aggregate:{server_round + self.offset}")  # test hook: mid-round, replies in hand
        arrays, metrics = self.inner.aggregate_train(server_round + self.offset, replies)
        self.train_metrics = dict(metrics or {})
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        metrics = self.inner.aggregate_evaluate(server_round + self.offset, replies)
        self.eval_metrics = dict(metrics or {})
        return metrics

    def take_metrics(self) -> dict[str, float]:
        """The last round's client metrics as row keys (``train/...``, ``fed_eval/...``), once."""
        taken = {**{f"train/{k}": v for k, v in self.train_metrics.items()},
                 **{f"fed_eval/{k}": v for k, v in self.eval_metrics.items()}}
        self.train_metrics, self.eval_metrics = {}, {}
        return taken


class RoundReporter:
    """Flower's ``evaluate_fn``, called with round 0 before training and after every round: the
    round's row, in order: plugins' ``after_aggregate``, traffic, central evaluation, client
    metrics, plugins' ``after_round``, the run log, progress, checkpoint, next round's hooks."""

    def __init__(self, spec: ServerSpec, grid: MeteredGrid, logger: RunLogger, hooks: PluginHooks,
                 evaluation: CentralEvaluation, rounds: RunRounds, strategy: ServedStrategy,
                 checkpoint: Callable[[int, ArrayRecord], None] | None = None, resumed: dict[str, Any] | None = None,
                 stop: StopRequest | None = None):
        self.spec, self.grid, self.logger, self.hooks, self.evaluation = spec, grid, logger, hooks, evaluation
        self.run_rounds, self.strategy, self.checkpoint, self.stop = rounds, strategy, checkpoint, stop
        self.cum_up = 0
        self.cum_down = 0
        self.cum_sim_s = 0.0
        self.started = time.time()
        self.rows: list[dict[str, Any]] = []
        self.offset = 0  # rounds already done before this process (a resumed run)
        self.initial: tuple[ArrayRecord, Any, float] | None = None  # round 0, reported after round 1
        if resumed is not None:
            self.cum_up, self.cum_down, self.rows = resumed["cum_up"], resumed["cum_down"], list(resumed["rows"])
            self.cum_sim_s = resumed.get("cum_sim_s", 0.0)
            self.offset = int(resumed["round"])
            self.started -= float(resumed["wall_s"])
        self.checkpointed = self.offset  # the last round whose checkpoint is in place
        self.progress = Progress(spec.rounds, self.offset, spec.progress)

    def state(self, server_round: int) -> dict[str, Any]:
        return {"round": server_round, "cum_up": self.cum_up, "cum_down": self.cum_down, "rows": self.rows,
                "cum_sim_s": self.cum_sim_s, "control_bytes": self.grid.control_bytes,
                "wall_s": time.time() - self.started}

    def __call__(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + self.offset
        if flower_round == 0:
            traffic = self.grid.close_round()  # round 0 has sent nothing (discovery is control traffic)
            if self.offset == 0:
                # The initial model is evaluated and logged after round 1's replies are in, so that the
                # first clients start training at once (the row is the same; only its timing moves).
                self.initial = (arrays, traffic, round(time.time() - self.started, 4))  # strategies never mutate it
            self.hooks.before_round(server_round + 1)
            return None
        if self.initial is not None:
            self._report(0, *self.initial)
            self.initial = None
        return self._report(server_round, arrays, self.grid.close_round())

    def _report(self, server_round: int, arrays: ArrayRecord, traffic: Any, wall_s: float | None = None) -> MetricRecord | None:
        plugin_scalars = self.hooks.after_aggregate(server_round, arrays) if server_round > 0 else {}
        self.cum_up += traffic.up_bytes
        self.cum_down += traffic.down_bytes
        self.cum_sim_s += traffic.sim_s
        evaluated = self.evaluation.due(server_round)
        result = self.evaluation(arrays) if evaluated else {}
        accuracy, loss = result.pop("accuracy", None), result.pop("loss", None)
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
            "rejected": len(self.strategy.rejected(server_round)),
            "stragglers": traffic.stragglers,
            "wall_s": round(time.time() - self.started, 4) if wall_s is None else wall_s,
        }
        if self.spec.clock is not None:
            row["sim_s"] = traffic.sim_s
            row["cum_sim_s"] = self.cum_sim_s
        row.update({f"eval/{k}": v for k, v in result.items()})
        if server_round > 0:  # the deferred round-0 row must not take round 1's client metrics
            row.update(self.run_rounds.take_metrics())
        plugin_scalars.update(self.hooks.after_round(server_round, row))
        row.update(plugin_scalars)
        self.logger.log_round(row, traffic.per_client_up)
        self.rows.append(row)
        kill_point(f"logged:{server_round}")  # test hook: the row is in metrics.jsonl, its checkpoint is not
        if server_round > 0:
            self.progress.advance(self.cum_up, accuracy)
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
            self.hooks.before_round(server_round + 1)
        return MetricRecord({"accuracy": accuracy, "loss": loss}) if evaluated else None


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
    extras = served(strategy)
    done_rounds = 0
    if resume is not None:
        done_rounds = resume.round
        initial = ArrayRecord(resume.arrays)
        extras.load_state_dict(resume.strategy)
        metered.restore_node_states(resume.node_states)
        restore_metrics(spec.run_dir, resume.reporter["rows"])
        if stop is not None:
            stop.checkpointed = done_rounds
    logger = RunLogger(spec.run_dir, tensorboard=spec.tensorboard, purge_step=done_rounds + 1 if resume else None)
    view = RunView(run_dir=spec.run_dir, federation=federation, build_model=build_model,
                   load_global=load_global, num_rounds=spec.rounds, initial_arrays=initial,
                   device=resolve_compute(spec.client.compute))

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        save_checkpoint(spec.run_dir, Checkpoint(server_round, arrays.to_torch_state_dict(), extras.state_dict(),
                                                 reporter.state(server_round), metered.node_states()))

    rounds = RunRounds(strategy, done_rounds)
    hooks = PluginHooks(plugins, view, logger, spec.rounds)
    reporter = RoundReporter(spec, metered, logger, hooks, CentralEvaluation(spec, view, extras), rounds, extras,
                             checkpoint, resume.reporter if resume is not None else None, stop)
    try:
        if resume is None:
            hooks.run_start()
        final = initial
        if done_rounds < spec.rounds:
            result = rounds.start(grid=metered, initial_arrays=initial, num_rounds=spec.rounds - done_rounds,
                                  timeout=spec.round_timeout,
                                  train_config=train_config(spec.train, spec.extra_train_config), evaluate_fn=reporter)
            final = result.arrays if len(result.arrays) else initial
        hooks.run_end()
    finally:
        reporter.progress.close()
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


def build_server_app(spec: ServerSpec, plugins: list[Plugin], outcome: RunOutcome,
                     resume: Checkpoint | None = None, stop: StopRequest | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            done = run_server(grid, spec, plugins, resume, stop)
            outcome.final_arrays, outcome.rows, outcome.control_bytes = done.final_arrays, done.rows, done.control_bytes
        except RunStopped as exc:  # a requested stop, not a failure of the ServerApp: fl.execute raises it
            outcome.error = exc    # once the engine has returned (no traceback from Flower's thread)
        except BaseException as exc:  # surfaced by fl.execute after the engine returns
            outcome.error = exc
            raise

    return app
