"""Vectorized clients for the in-process engine (``engine.batch_clients=K``): the ``dense``
trainer (FedAvg) and the ``delta`` trainer (DELTA, per tier).

``ClientBatching`` answers a list of train messages of those trainers with the replies the
ClientApp's train handler would send (``clients.app``): the same environment per node (its
partition's data, ``Context.state``, the generator seeded from run seed, round and partition),
the same received weights, training as one vmap instead of one client at a time, the same reply
encoding and the same metric keys. Dense: messages that share the received record, codecs and
hyper-parameters train as one ``fl.vectorized.train_dense_vectorized`` call (``decode_shared``
once, ``encode_reply`` with the node's state). DELTA: messages of one tier that share its settings,
codecs and hyper-parameters train as ``clients.delta_trainer.train_fused_vectorized`` calls, one
per step schedule, each client from its own ``receive`` (which keeps E and the classifier in the
node's state as the sequential trainer does) and replying with ``upload``. ``train_seconds`` is each
client's share of its call. Runs with plugins or faults get no batch handler
(``fl.execute.batches_clients``): their client hooks and mods see one message at a time.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

from clients.app import note_first_train
from clients.delta_trainer import NAME as DELTA
from clients.delta_trainer import TIER_WIDTH, DeltaClientSettings, receive, tier_model, train_fused_vectorized, upload
from clients.trainer import TRAINER, ClientEnv, hyper_from
from fl.compute import to_cpu
from fl.delta.slices import template_state
from fl.message_keys import ARRAYS, CODEC, CONFIG, METRICS, NUM_EXAMPLES, UP_CODEC
from fl.payload import decode_shared, encode_reply, get_codec
from fl.specs import ClientSpec
from fl.vectorized import groups, train_dense_vectorized

DENSE = "dense"
BATCHED = (DENSE, DELTA)  # the trainers this handler trains as one vmap


class ClientBatching:
    """The in-process engine's batch handler for ``spec``'s clients, at most ``size`` per call."""

    def __init__(self, spec: ClientSpec, size: int):
        self.spec = spec
        self.size = size

    def batchable(self, message: Message) -> bool:
        return message.metadata.message_type == MessageType.TRAIN and _trainer(message) in BATCHED

    def __call__(self, work: list[tuple[Message, Context]]) -> list[Message]:
        envs = [ClientEnv.for_message(self.spec, msg, context) for msg, context in work]
        replies: list[Message | None] = [None] * len(work)
        dense = [i for i, (msg, _) in enumerate(work) if _trainer(msg) == DENSE]
        self._dense(work, envs, dense, replies)
        self._delta(work, envs, [i for i, (msg, _) in enumerate(work) if _trainer(msg) != DENSE], replies)
        return replies  # type: ignore[return-value]

    def _dense(self, work: list[tuple[Message, Context]], envs: list[ClientEnv], indices: list[int],
               replies: list[Message | None]) -> None:
        calls: dict[tuple, list[int]] = {}
        for i in indices:
            config = work[i][0].content[CONFIG]
            key = (id(work[i][0].content[ARRAYS]), str(config.get(CODEC, "dense_fp32")),
                   str(config.get(UP_CODEC, "dense_fp32")), hyper_from(config))
            calls.setdefault(key, []).append(i)
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

    def _delta(self, work: list[tuple[Message, Context]], envs: list[ClientEnv], indices: list[int],
               replies: list[Message | None]) -> None:
        calls: dict[tuple, list[int]] = {}
        for i in indices:
            config = work[i][0].content[CONFIG]
            key = (DeltaClientSettings.from_config(config), str(config.get(CODEC)), str(config.get(UP_CODEC)),
                   hyper_from(config))
            calls.setdefault(key, []).append(i)
        for (s, _, _, hyper), members in calls.items():
            full = template_state(s.arch_json)
            config = work[members[0]][0].content[CONFIG]
            receiveds = [receive(work[i][0].content[ARRAYS], work[i][0].content[CONFIG], envs[i], s, full)
                         for i in members]
            datas = [envs[i].local_splits(s.val_fraction)[0] for i in members]
            with tier_model(s, envs[members[0]].device) as model:
                note_first_train()
                for group in groups(datas, hyper, 1):
                    started = time.perf_counter()
                    states, metrics = train_fused_vectorized(model, [receiveds[g] for g in group],
                                                             [datas[g] for g in group], config, s,
                                                             [envs[members[g]].generator for g in group])
                    seconds = (time.perf_counter() - started) / len(group)
                    for g, state, m in zip(group, states, metrics):
                        i = members[g]
                        record = upload(to_cpu(state), work[i][0].content[CONFIG], s, full)
                        m.update({TIER_WIDTH: s.width, NUM_EXAMPLES: len(datas[g]),
                                  "train_seconds": seconds})
                        replies[i] = Message(RecordDict({ARRAYS: record, METRICS: MetricRecord(m)}),
                                             reply_to=work[i][0])


def _trainer(message: Message) -> str:
    return str(message.content[CONFIG].get(TRAINER, DENSE))
