"""The ClientApp: the same object runs in the simulator (either engine) and on a real SuperNode.

``build_client_app(spec)`` bakes a ``ClientSpec`` in (simulation); without one it reads it from
``context.run_config`` (``fl-client-spec``), which ``fl.deploy.device.device_mod`` puts there from
the run config and the node config: ``fl.deploy.client_app:app`` (this app with that mod) is the
one to run under any ServerApp, this project's or a stock Flower one. The module-level ``app``
here has no mod (``clients`` may not import ``fl.deploy``, which builds specs through ``fl.config``);
without a spec it stops with a line that names ``fl.deploy.client_app:app``. Each train message
says how to train (keys it omits take the CLI's defaults, ``clients.trainer.hyper_from``), and
replies are what Flower's strategies aggregate (an ``ArrayRecord`` and a ``MetricRecord`` with
``num-examples``). Each handler does Flower plumbing only: the train and evaluate handlers build
the client's environment and call the trainer (or its evaluator) the server named
(``clients.trainer``, ``dense`` when the message names none); query is a few lines.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.trainer import TRAINER, TRAINERS, ClientEnv, evaluator_for, run_trainer
from fl.message_keys import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID
from fl.specs import ClientSpec

_first_train_at: list[float] = []  # wall-clock time the first local training of this process began


def first_train_time() -> float | None:
    return _first_train_at[0] if _first_train_at else None


def note_first_train() -> None:
    """Stamp the wall-clock time this process's first local training begins (once)."""
    if not _first_train_at:
        _first_train_at.append(time.time())


def build_client_app(spec: ClientSpec | None = None, mods: list | None = None) -> ClientApp:
    """``mods``: Flower client mods (middleware), e.g. the simulator's fault injection."""
    app = ClientApp(mods=mods)
    plugin_cache: dict[ClientSpec, list] = {}

    def resolve(context: Context) -> tuple[ClientSpec, list]:
        resolved = spec or ClientSpec.from_run_config(context.run_config)
        if resolved not in plugin_cache:
            plugin_cache[resolved] = [p.build() for p in resolved.plugins]
        return resolved, plugin_cache[resolved]

    def environment(msg: Message, context: Context) -> ClientEnv:
        client_spec, plugins = resolve(context)
        return ClientEnv.for_message(client_spec, msg, context, plugins)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        env = environment(msg, context)
        config = msg.content[CONFIG]
        trainer = TRAINERS.get(str(config.get(TRAINER, "dense")))
        note_first_train()
        started = time.perf_counter()
        record, metrics = run_trainer(trainer, msg.content[ARRAYS], config, env)
        metrics["train_seconds"] = time.perf_counter() - started
        for plugin in env.plugins:
            record = plugin.on_payload(env.view, record)
        metrics.setdefault(NUM_EXAMPLES, len(env.data))  # a trainer that holds data out reports its own
        return Message(RecordDict({ARRAYS: record, METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        env = environment(msg, context)
        metrics = evaluator_for(msg.content[CONFIG])(msg.content[ARRAYS], msg.content[CONFIG], env)
        metrics.setdefault(NUM_EXAMPLES, len(env.data))
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.query("partition")
    def query_partition(msg: Message, context: Context) -> Message:
        partition = context.node_config.get(PARTITION_ID)
        metrics = MetricRecord({} if partition is None else {PARTITION_ID: int(partition)})
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)

    return app


app = build_client_app()
