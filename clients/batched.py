"""Vectorized clients for the in-process engine (``engine.batch_clients=K``): the ``dense``
trainer (FedAvg), the ``delta`` trainer (DELTA, per tier) and the ``masked`` trainer (FedDST-like,
outside its readjustment rounds).

``ClientBatching`` answers a list of train messages of those trainers with the replies the
ClientApp's train handler would send (``clients.app``): the same environment per node (its
partition's data, ``Context.state``, the generator seeded from run seed, round and partition),
the same received weights, training as one vmap instead of one client at a time, the same reply
encoding and the same metric keys. Dense: messages that share the received record, codecs and
hyper-parameters train as one ``fl.vectorized.train_dense_vectorized`` call (``decode_shared``
once, ``encode_reply`` with the node's state). DELTA: messages of one tier that share its settings,
codecs and hyper-parameters train as ``clients.delta_trainer.train_fused_vectorized`` calls, one
per step schedule, each client from its own ``receive`` (which keeps E and the classifier in the
node's state as the sequential trainer does) and replying with ``upload``. Masked: messages that
share the received record, mask version, codecs and hyper-parameters train as one
``train_dense_vectorized`` call under the global mask (``receive_masked`` per node, which keeps
the mask a bitmap brings); a readjustment round (``readjust-alpha`` > 0) needs each client's
dense gradient and trains one client at a time. ``train_seconds`` is each client's share of its
call. Runs with plugins or faults get no batch handler (``fl.execute.batches_clients``): their
client hooks and mods see one message at a time.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients.app import note_first_train
from clients.delta_trainer import NAME as DELTA
from clients.delta_trainer import TIER_WIDTH, DeltaClientSettings, receive, tier_model, train_fused_vectorized, upload
from clients.feddst_trainer import (MASK_HAMMING, MASK_VERSION, MASKED, READJUST_ALPHA, bitmap_codec_from,
                                    receive_masked)
from clients.trainer import TRAINER, ClientEnv, hyper_from
from fl.compute import all_to_cpu, resolve_compute
from fl.delta.slices import template_state
from fl.message_keys import ARRAYS, CODEC, CONFIG, METRICS, NUM_EXAMPLES, UP_CODEC
from fl.payload import decode_shared, encode_reply, get_codec
from fl.specs import ClientSpec
from fl.vectorized import groups, train_dense_vectorized

DENSE = "dense"


class ClientBatching:
    """The in-process engine's batch handler for ``spec``'s clients, at most ``size`` per call."""

    def __init__(self, spec: ClientSpec, size: int):
        self.spec = spec
        self.size = size

    def batchable(self, message: Message) -> bool:
        trainer = _trainer(message)
        return (message.metadata.message_type == MessageType.TRAIN and trainer in _SHARED
                and (trainer != MASKED or float(message.content[CONFIG].get(READJUST_ALPHA, 0.0)) == 0.0))

    def chunks(self, messages: list[Message], workers: int) -> list[list[Message]]:
        """The calls that answer ``messages`` (batchable ones) on ``workers`` engine threads:
        messages that train as one vmap side by side, then cut into runs. On an accelerator a run
        is up to ``size``: one vmap of K clients is one sequence of kernel launches. On the CPU the
        runs spread the messages evenly over the threads (still at most ``size``): one call
        computes on one worker's cores, and a wider vmap is no faster there (grouped convolutions)."""
        together: dict[tuple, list[Message]] = {}
        for message in messages:
            together.setdefault(_group_key(message), []).append(message)
        ordered = [message for group in together.values() for message in group]
        per = self.size
        if resolve_compute(self.spec.compute).type == "cpu":
            per = max(1, min(self.size, math.ceil(len(ordered) / max(workers, 1))))
        return [ordered[start:start + per] for start in range(0, len(ordered), per)]

    def __call__(self, work: list[tuple[Message, Context]]) -> list[Message]:
        envs = [ClientEnv.for_message(self.spec, msg, context) for msg, context in work]
        replies: list[Message | None] = [None] * len(work)
        of = [_trainer(msg) for msg, _ in work]
        self._dense(work, envs, [i for i, t in enumerate(of) if t == DENSE], replies)
        self._delta(work, envs, [i for i, t in enumerate(of) if t == DELTA], replies)
        self._masked(work, envs, [i for i, t in enumerate(of) if t == MASKED], replies)
        return replies  # type: ignore[return-value]

    def _dense(self, work: list[tuple[Message, Context]], envs: list[ClientEnv], indices: list[int],
               replies: list[Message | None]) -> None:
        for (_, _, down, up, hyper), members in _calls(work, indices).items():
            first = work[members[0]][0]
            with envs[members[0]].model() as model:
                received = decode_shared(get_codec(down), first.content[ARRAYS], model.state_dict())
                note_first_train()
                started = time.perf_counter()
                states, metrics = train_dense_vectorized(model, received, [envs[i].data for i in members], hyper,
                                                         [envs[i].generator for i in members])
                seconds = (time.perf_counter() - started) / len(members)
            for i, state, m in zip(members, all_to_cpu(states), metrics):
                record = encode_reply(get_codec(up), state, received, envs[i].state)
                m["train_seconds"] = seconds
                m.setdefault(NUM_EXAMPLES, len(envs[i].data))
                replies[i] = _reply(work[i][0], record, m)

    def _delta(self, work: list[tuple[Message, Context]], envs: list[ClientEnv], indices: list[int],
               replies: list[Message | None]) -> None:
        for (_, s, _, _, hyper), members in _calls(work, indices).items():
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
                    for g, state, m in zip(group, all_to_cpu(states), metrics):
                        i = members[g]
                        record = upload(state, work[i][0].content[CONFIG], s, full)
                        m.update({TIER_WIDTH: s.width, NUM_EXAMPLES: len(datas[g]),
                                  "train_seconds": seconds})
                        replies[i] = _reply(work[i][0], record, m)

    def _masked(self, work: list[tuple[Message, Context]], envs: list[ClientEnv], indices: list[int],
                replies: list[Message | None]) -> None:
        for (_, _, version, _, _, hyper), members in _calls(work, indices).items():
            first = work[members[0]][0]
            up = bitmap_codec_from(first.content[CONFIG], UP_CODEC)
            with envs[members[0]].model() as model:
                reference = model.state_dict()
                for i in members:  # each node keeps the mask a bitmap brings; one decode for all
                    received, masks = receive_masked(work[i][0].content[ARRAYS], work[i][0].content[CONFIG],
                                                     envs[i], reference, envs[i].device)
                note_first_train()
                started = time.perf_counter()
                states, metrics = train_dense_vectorized(model, received, [envs[i].data for i in members], hyper,
                                                         [envs[i].generator for i in members], masks)
                seconds = (time.perf_counter() - started) / len(members)
            for i, state, m in zip(members, all_to_cpu(states), metrics):
                record = up.encode_masked(state, masks, with_bitmap=False)
                m.update({MASK_VERSION: version, MASK_HAMMING: 0, "train_seconds": seconds})
                m.setdefault(NUM_EXAMPLES, len(envs[i].data))
                replies[i] = _reply(work[i][0], record, m)


def _calls(work: list[tuple[Message, Context]], indices: list[int]) -> dict[tuple, list[int]]:
    """``indices`` grouped into one vectorized call per ``_group_key``."""
    calls: dict[tuple, list[int]] = {}
    for i in indices:
        calls.setdefault(_group_key(work[i][0]), []).append(i)
    return calls


def _group_key(message: Message) -> tuple:
    """What messages must share to train as one vmap: the trainer, then ``_SHARED``'s fields."""
    trainer = _trainer(message)
    return (trainer, *_SHARED[trainer](message, message.content[CONFIG]))


_SHARED: dict[str, Callable[[Message, ConfigRecord], tuple]] = {  # the batched trainers: what their vmap shares
    DENSE: lambda msg, config: (id(msg.content[ARRAYS]), str(config.get(CODEC, "dense_fp32")),
                                str(config.get(UP_CODEC, "dense_fp32")), hyper_from(config)),
    DELTA: lambda msg, config: (DeltaClientSettings.from_config(config), str(config.get(CODEC)),
                                str(config.get(UP_CODEC)), hyper_from(config)),
    MASKED: lambda msg, config: (id(msg.content[ARRAYS]), int(config[MASK_VERSION]), str(config.get(CODEC)),
                                 str(config.get(UP_CODEC)), hyper_from(config)),
}


def _reply(message: Message, record: ArrayRecord, metrics: dict[str, float]) -> Message:
    """The reply the ClientApp's train handler sends: the payload and the metrics."""
    return Message(RecordDict({ARRAYS: record, METRICS: MetricRecord(metrics)}), reply_to=message)


def _trainer(message: Message) -> str:
    return str(message.content[CONFIG].get(TRAINER, DENSE))
