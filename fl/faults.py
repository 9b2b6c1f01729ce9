"""Simulated client faults, injected as a Flower client mod around the unchanged ClientApp.

For each (round, partition) a generator seeded from the run seed decides, independently:
  crash  (probability ``crash``): the client raises; the engine returns an error reply
  hang   (``hang``): the client sleeps ``hang_seconds`` (set it past ``round_timeout``) then replies
  late   (``late``): the client sleeps a uniform fraction of ``late_seconds`` then replies
  nan    (``nan``): the client's update has a NaN in it (to exercise update validation)
Only train messages are affected. A mod is Flower's middleware for ClientApps, so the ClientApp,
the trainers and everything a real SuperNode runs stay untouched; the simulator adds the mod.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fl.keys import ARRAYS, CONFIG, PARTITION_ID, SERVER_ROUND

_FAULT_STREAM = 0xFA17


@dataclass(frozen=True)
class FaultSpec:
    crash: float = 0.0
    hang: float = 0.0
    late: float = 0.0
    nan: float = 0.0
    hang_seconds: float = 30.0
    late_seconds: float = 1.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return any(p > 0 for p in (self.crash, self.hang, self.late, self.nan))

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
