"""The ClientApp: the same object runs in the simulator (either engine) and on a real SuperNode.

``build_client_app(spec)`` bakes a ``ClientSpec`` in (simulation); the module-level ``app`` reads
it from ``context.run_config`` (deployment with ``flwr run``). Each handler does Flower plumbing
only: the train handler builds the client's environment and calls the trainer the server named
(``clients.trainer``); evaluate and query are a few lines each.
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.dense import ClientData, evaluate
from clients.resident import borrowed_model
from clients.trainer import TRAINER, TRAINERS, ClientEnv
from fl.keys import ARRAYS, CODEC, CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID, SERVER_ROUND
from fl.payload import decode_shared, get_codec
from fl.sampling import seed_for
from fl.specs import ClientSpec

_first_train_at: list[float] = []  # wall-clock time the first local training of this process began


def first_train_time() -> float | None:
    return _first_train_at[0] if _first_train_at else None


def build_client_app(spec: ClientSpec | None = None) -> ClientApp:
    app = ClientApp()
    plugin_cache: dict[ClientSpec, list] = {}

    def resolve(context: Context) -> tuple[ClientSpec, list]:
        resolved = spec or ClientSpec.from_run_config(context.run_config)
        if resolved not in plugin_cache:
            plugin_cache[resolved] = [p.build() for p in resolved.plugins]
        return resolved, plugin_cache[resolved]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client_spec, plugins = resolve(context)
        partition = int(context.node_config[PARTITION_ID])
        federation = client_spec.data.federation()
        config = msg.content[CONFIG]
        server_round = int(config[SERVER_ROUND])
        env = ClientEnv(spec=client_spec, federation=federation,
                        data=ClientData(federation.train, federation.client_indices[partition]),
                        partition_id=partition, server_round=server_round, state=context.state,
                        generator=torch.Generator().manual_seed(seed_for(client_spec.seed, server_round, partition)),
                        plugins=plugins)
        trainer = TRAINERS.get(str(config.get(TRAINER, "dense")))
        if not _first_train_at:
            _first_train_at.append(time.time())
        started = time.perf_counter()
        record, metrics = trainer(msg.content[ARRAYS], config, env)
        metrics["train_seconds"] = time.perf_counter() - started
        for plugin in plugins:
            record = plugin.on_payload(env.view, record)
        metrics[NUM_EXAMPLES] = len(env.data)
        return Message(RecordDict({ARRAYS: record, METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        client_spec, _ = resolve(context)
        partition = int(context.node_config[PARTITION_ID])
        federation = client_spec.data.federation()
        data = ClientData(federation.train, federation.client_indices[partition])
        config = msg.content[CONFIG]
        with borrowed_model(client_spec.model, lambda: client_spec.model.build_for(federation)) as model:
            received = decode_shared(get_codec(str(config.get(CODEC, "dense_fp32"))), msg.content[ARRAYS],
                                     model.state_dict())
            model.load_state_dict(received)
            metrics = evaluate(model, data)
        metrics[NUM_EXAMPLES] = len(data)
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.query("partition")
    def query_partition(msg: Message, context: Context) -> Message:
        partition = context.node_config.get(PARTITION_ID)
        metrics = MetricRecord({} if partition is None else {PARTITION_ID: int(partition)})
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)

    return app


app = build_client_app()
