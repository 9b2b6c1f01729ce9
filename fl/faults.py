"""Simulated client faults, injected as a Flower client mod around the unchanged ClientApp.

For each (round, partition) a generator seeded from the run seed decides, independently:
  crash  (probability ``crash``): the client raises; the engine returns an error reply
  hang   (``hang``): the client sleeps ``hang_seconds`` (set it past ``round_timeout``) then replies
  late   (``late``): the client sleeps a uniform fraction of ``late_seconds`` then replies
  nan    (``nan``): the client's update has a NaN in it (to exercise update validation)
A share ``hostile`` of the partitions (round(hostile * N), drawn once from the run seed) is hostile
in every round:
  huge          (``hostile_kind``): every floating value it uploads is 3e38 (finite in float32)
  inflate       it claims ``num-examples`` = 1e30
  nan_examples  it claims ``num-examples`` = NaN
  misshapen     an uploaded tensor's metadata keeps its shape, but its bytes hold the flattened array
Only train messages are affected. A mod is Flower's middleware for ClientApps, so the ClientApp,
the trainers and everything a real SuperNode runs stay untouched; the simulator adds the mod.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fl.message_keys import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, NUM_PARTITIONS, PARTITION_ID, SERVER_ROUND

_FAULT_STREAM = 0xFA17
_HOSTILE_STREAM = 0x4057
HOSTILE_KINDS = ("huge", "inflate", "nan_examples", "misshapen")
HUGE = 3e38
INFLATED_EXAMPLES = 1e30


@dataclass(frozen=True)
class FaultSpec:
    crash: float = 0.0
    hang: float = 0.0
    late: float = 0.0
    nan: float = 0.0
    hostile: float = 0.0
    hostile_kind: str = "huge"
    hang_seconds: float = 30.0
    late_seconds: float = 1.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return any(p > 0 for p in (self.crash, self.hang, self.late, self.nan, self.hostile))

    def is_hostile(self, partition: int, num_partitions: int) -> bool:
        """Exactly round(hostile * N) of the N partitions, the same ones in every round."""
        return self.hostile > 0 and partition in _hostile_partitions(self.seed, self.hostile, num_partitions)

    def draw(self, server_round: int, partition: int) -> dict[str, float]:
        u = np.random.default_rng([self.seed, _FAULT_STREAM, server_round, partition]).random(5)
        return {"crash": u[0] < self.crash, "hang": u[1] < self.hang, "late": u[2] < self.late,
                "nan": u[3] < self.nan, "late_fraction": float(u[4])}


class SimulatedCrash(RuntimeError):
    pass


def fault_mod(spec: FaultSpec):
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not msg.metadata.message_type.startswith("train"):
            return call_next(msg, context)
        fate = spec.draw(int(msg.content[CONFIG][SERVER_ROUND]), int(context.node_config[PARTITION_ID]))
        if fate["crash"]:
            raise SimulatedCrash("simulated client crash")
        if fate["hang"]:
            time.sleep(spec.hang_seconds)
        elif fate["late"]:
            time.sleep(spec.late_seconds * fate["late_fraction"])
        reply = call_next(msg, context)
        if fate["nan"] and reply.has_content():
            reply.content[ARRAYS] = _with_nan(reply.content[ARRAYS])
        if reply.has_content() and spec.is_hostile(int(context.node_config[PARTITION_ID]),
                                                    int(context.node_config[NUM_PARTITIONS])):
            if spec.hostile_kind == "huge":
                reply.content[ARRAYS] = _huge(reply.content[ARRAYS])
            elif spec.hostile_kind == "misshapen":
                reply.content[ARRAYS] = _misshapen(reply.content[ARRAYS])
            else:
                reply.content[METRICS][NUM_EXAMPLES] = INFLATED_EXAMPLES if spec.hostile_kind == "inflate" else float("nan")
        return reply

    return mod


def _with_nan(record: ArrayRecord) -> ArrayRecord:
    arrays = {name: array.numpy() for name, array in record.items()}
    for name, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating) and value.size:
            value = value.copy()
            value.flat[0] = np.nan
            arrays[name] = value
            break
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


@functools.lru_cache(maxsize=8)
def _hostile_partitions(seed: int, share: float, num_partitions: int) -> frozenset[int]:
    """The hostile partitions of a run, drawn once per process rather than on every message."""
    order = np.random.default_rng([seed, _HOSTILE_STREAM]).permutation(num_partitions)
    return frozenset(order[:round(share * num_partitions)].tolist())


def _huge(record: ArrayRecord) -> ArrayRecord:
    arrays = {name: array.numpy() for name, array in record.items()}
    return ArrayRecord({name: Array(np.full_like(value, HUGE) if np.issubdtype(value.dtype, np.floating) else value)
                        for name, value in arrays.items()})


def _misshapen(record: ArrayRecord) -> ArrayRecord:
    """The first floating array's bytes replaced by a reshaped copy (flattened, or a 1-D array as
    one row), under metadata that still gives the original shape."""
    out, done = {}, False
    for name, array in record.items():
        value = array.numpy()
        if not done and np.issubdtype(value.dtype, np.floating) and value.size > 1:
            reshaped = value.reshape(-1) if value.ndim > 1 else value.reshape(1, -1)
            array = Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=Array(reshaped).data)
            done = True
        out[name] = array
    return ArrayRecord(out)
