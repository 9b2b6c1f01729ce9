"""The ClientApp: the same object runs in the simulator (either engine) and on a real SuperNode.

``build_client_app(spec)`` bakes a ``ClientSpec`` in (simulation); the module-level ``app`` reads
it from ``context.run_config`` (deployment with ``flwr run``). Each handler does Flower plumbing
only: decode the payload, call a plain trainer, encode the reply.
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.dense import ClientData, TrainHyper, evaluate, train_dense
from clients.resident import borrowed_model
from fl.hooks import ClientView
from fl.keys import (ARRAYS, BATCH_SIZE, CODEC, CONFIG, EPOCHS, LR, METRICS, MOMENTUM, NUM_EXAMPLES, PARTITION_ID,
                     SERVER_ROUND, UP_CODEC, WEIGHT_DECAY)
from fl.payload import decode_shared, get_codec
from fl.sampling import seed_for
from fl.specs import ClientSpec

_DEFAULTS = TrainHyper()
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
        data = ClientData(federation.train, federation.client_indices[partition])
        config = msg.content[CONFIG]
        server_round = int(config[SERVER_ROUND])
        hyper = TrainHyper(
            epochs=int(config.get(EPOCHS, _DEFAULTS.epochs)),
            batch_size=int(config.get(BATCH_SIZE, _DEFAULTS.batch_size)),
            lr=float(config.get(LR, _DEFAULTS.lr)),
            momentum=float(config.get(MOMENTUM, _DEFAULTS.momentum)),
            weight_decay=float(config.get(WEIGHT_DECAY, _DEFAULTS.weight_decay)),
        )
        view = ClientView(partition_id=partition, server_round=server_round, state=context.state)
        with borrowed_model(client_spec.model, lambda: client_spec.model.build_for(federation)) as model:
            reference = model.state_dict()
            received = decode_shared(get_codec(str(config.get(CODEC, "dense_fp32"))), msg.content[ARRAYS], reference)
            model.load_state_dict(received)
            for plugin in plugins:
                plugin.before_train(view, model, config)
            generator = torch.Generator().manual_seed(seed_for(client_spec.seed, server_round, partition))
            if not _first_train_at:
                _first_train_at.append(time.time())
            started = time.perf_counter()
            metrics = train_dense(model, data, hyper, generator)
            metrics["train_seconds"] = time.perf_counter() - started
            for plugin in plugins:
                metrics.update({f"plugin/{plugin.name}/{k}": v for k, v in (plugin.after_train(view, model, metrics) or {}).items()})
            record = get_codec(str(config.get(UP_CODEC, "dense_fp32"))).encode(model.state_dict())
        for plugin in plugins:
            record = plugin.on_payload(view, record)
        metrics[NUM_EXAMPLES] = len(data)
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
