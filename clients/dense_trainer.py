"""The ``dense`` trainer: FedAvg's client step on the whole model (``clients.dense.train_dense``)."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord

from clients.dense import train_dense
from clients.trainer import ClientEnv, hyper_from, register_trainer
from fl.keys import CODEC, UP_CODEC
from fl.payload import decode_shared, get_codec


@register_trainer("dense")
def dense(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> tuple[ArrayRecord, dict[str, float]]:
    with env.model() as model:
        received = decode_shared(get_codec(str(config.get(CODEC, "dense_fp32"))), arrays, model.state_dict())
        model.load_state_dict(received)
        env.before_train(model, config)
        metrics = train_dense(model, env.data, hyper_from(config), env.generator)
        metrics.update(env.after_train(model, metrics))
        return get_codec(str(config.get(UP_CODEC, "dense_fp32"))).encode(model.state_dict()), metrics
