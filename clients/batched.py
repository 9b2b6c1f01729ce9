"""Vectorized ``dense`` clients for the in-process engine (``engine.batch_clients=K``).

``DenseBatching`` answers a list of train messages of the ``dense`` trainer with the replies the
ClientApp's train handler would send (``clients.app``): the same environment per node (its
partition's data, ``Context.state``, the generator seeded from run seed, round and partition),
the same received weights (``fl.payload.decode_shared``), training by
``fl.vectorized.train_dense_vectorized`` instead of ``train_dense`` one client at a time, the same
reply encoding (``encode_reply`` with the message's up codec and the node's state) and the same
metric keys (``train_loss``, ``train_accuracy``, ``train_seconds``, ``num-examples``). Messages
that share the received record, codecs and hyper-parameters train as one call; ``train_seconds``
is each client's share of that call. Runs with plugins or faults get no batch handler
(``fl.execute.batches_clients``): their client hooks and mods see one message at a time.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

from clients.app import note_first_train
from clients.trainer import TRAINER, ClientEnv, hyper_from
from fl.compute import to_cpu
from fl.message_keys import ARRAYS, CODEC, CONFIG, METRICS, NUM_EXAMPLES, UP_CODEC
from fl.payload import decode_shared, encode_reply, get_codec
from fl.specs import ClientSpec
from fl.vectorized import train_dense_vectorized


class DenseBatching:
    """The in-process engine's batch handler for ``spec``'s clients, at most ``size`` per call."""

    def __init__(self, spec: ClientSpec, size: int):
        self.spec = spec
        self.size = size

    def batchable(self, message: Message) -> bool:
        return (message.metadata.message_type == MessageType.TRAIN
                and str(message.content[CONFIG].get(TRAINER, "dense")) == "dense")

    def __call__(self, work: list[tuple[Message, Context]]) -> list[Message]:
        envs = [ClientEnv.for_message(self.spec, msg, context) for msg, context in work]
        calls: dict[tuple, list[int]] = {}
        for i, (msg, _) in enumerate(work):
            config = msg.content[CONFIG]
            key = (id(msg.content[ARRAYS]), str(config.get(CODEC, "dense_fp32")),
                   str(config.get(UP_CODEC, "dense_fp32")), hyper_from(config))
            calls.setdefault(key, []).append(i)
        replies: list[Message | None] = [None] * len(work)
        for (_, down, up, hyper), members in calls.items():
            first = work[members[0]][0]
            with envs[members[0]].model() as model:
                received = decode_shared(get_codec(down), first.content[ARRAYS], model.state_dict())
                note_first_train()
                started = time.perf_counter()
                states, metrics = train_dense_vectorized(model, received, [envs[i].data for i in members], hyper,
                                                         [envs[i].generator for i in members])
                seconds = (time.perf_counter() - started) / len(members)
            for i, state, m in zip(members, states, metrics):
                record = encode_reply(get_codec(up), to_cpu(state), received, envs[i].state)
                m["train_seconds"] = seconds
                m.setdefault(NUM_EXAMPLES, len(envs[i].data))
                replies[i] = Message(RecordDict({ARRAYS: record, METRICS: MetricRecord(m)}), reply_to=work[i][0])
        return replies  # type: ignore[return-value]
