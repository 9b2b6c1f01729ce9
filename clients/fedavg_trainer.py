"""The ``dense`` trainer and evaluator: FedAvg's client step on the whole model
(``fl.local_training.train_dense``) and accuracy of the received model on the client's own data."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from flwr.app import ArrayRecord, ConfigRecord

from clients.trainer import ClientEnv, Session, hyper_from, register_evaluator, register_trainer
from fl.compute import to_cpu
from fl.local_training import evaluate, train_dense
from fl.message_keys import CODEC, UP_CODEC
from fl.payload import decode_shared, encode_reply, get_codec


@register_trainer("dense")
@contextmanager
def dense(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> Iterator[Session]:
    with env.model() as model:
        down = get_codec(str(config.get(CODEC, "dense_fp32")))
        received = decode_shared(down, arrays, model.state_dict())  # on the CPU: what the reply's update subtracts
        model.load_state_dict(decode_shared(down, arrays, model.state_dict(), env.device))
        up = get_codec(str(config.get(UP_CODEC, "dense_fp32")))
        yield Session(model, train=lambda: train_dense(model, env.data, hyper_from(config), env.generator),
                      reply=lambda: encode_reply(up, to_cpu(model.state_dict()), received, env.state))


@register_evaluator("dense")
def dense_evaluate(arrays: ArrayRecord, config: ConfigRecord, env: ClientEnv) -> dict[str, float]:
    with env.model() as model:
        down = get_codec(str(config.get(CODEC, "dense_fp32")))
        model.load_state_dict(decode_shared(down, arrays, model.state_dict(), env.device))
        return evaluate(model, env.data)
