"""Payload codecs and byte accounting: the one home for how models travel and what that costs.

DESIGN.md section 2: every message's payload is counted from what is actually serialized, the
Flower ``Message`` content, never from a formula beside it. Flower serializes an ``ArrayRecord``
as one NumPy ``.npy`` buffer per array (``Array.data``); ``ArrayRecord.count_bytes()`` is the
length of those buffers plus the keys, and ``ConfigRecord``/``MetricRecord.count_bytes()`` the
size of their values and keys. ``payload_bytes`` sums these over the whole ``RecordDict``.

Flower's object store adds a header per object (type, child ids, length) when the content is
pushed over gRPC; ``wire_bytes`` computes that exact figure with Flower's own ``deflate``. It costs
a SHA-256 over every buffer (about 10 ms per 2.5 MB on this machine's CPU, measured), so the
simulator logs ``payload_bytes`` and a test bounds the difference (under 0.5% for the shipped
models).

Codecs turn a ``{name: tensor}`` state into an ``ArrayRecord`` and back. The receiver needs the
reference state (names, shapes, dtypes) to decode; it always has one (its own model).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fl.registry import Registry

State = dict[str, torch.Tensor]


# -- byte accounting -------------------------------------------------------------------------

def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serializes its records (plus the record keys)."""
    return sum(len(key) + record.count_bytes() for key, record in content.items())


def wire_bytes(content: RecordDict) -> int:
    """Exact size of the content's deflated object tree as Flower's object store sends it."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


# -- codecs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Codec:
    """A lossless or lossy state <-> ArrayRecord mapping, registered by name."""

    name: str
    encode: Callable[[Mapping[str, torch.Tensor]], ArrayRecord]
    decode: Callable[[ArrayRecord, Mapping[str, torch.Tensor]], State]


CODECS: Registry[Codec] = Registry("codec", "codec")


def register_codec(codec: Codec) -> Codec:
    CODECS.register(codec.name)(codec)
    return codec


def get_codec(name: str) -> Codec:
    return CODECS.get(name)


def _to_array(tensor: torch.Tensor, dtype: np.dtype | None = None) -> Array:
    array = tensor.detach().cpu().numpy()
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    return Array(array)


def _decode_arrays(record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
    if list(record.keys()) != list(reference.keys()):
        missing = sorted(set(reference) - set(record))
        extra = sorted(set(record) - set(reference))
        raise ValueError(f"payload keys differ from the model: missing {missing}, unexpected {extra}")
    state: State = {}
    for name, ref in reference.items():
        array = record[name].numpy()
        if tuple(array.shape) != tuple(ref.shape):
            raise ValueError(f"payload array {name!r} has shape {array.shape}, model has {tuple(ref.shape)}")
        state[name] = torch.from_numpy(array).to(ref.dtype)
    return state


def _encode_fp32(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: _to_array(t) for name, t in state.items()})


def _encode_fp16(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Floating tensors as float16; integer buffers (e.g. BatchNorm's counter) unchanged."""
    return ArrayRecord(
        {name: _to_array(t, np.dtype(np.float16) if t.is_floating_point() else None) for name, t in state.items()}
    )


DENSE_FP32 = register_codec(Codec("dense_fp32", _encode_fp32, _decode_arrays))
FP16 = register_codec(Codec("fp16", _encode_fp16, _decode_arrays))


# -- decoding a broadcast once ---------------------------------------------------------------

_decoded: dict[int, tuple["weakref.ref[ArrayRecord]", str, State]] = {}
_decoded_lock = threading.Lock()


def decode_shared(codec: Codec, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
    """Decode ``record``, reusing the result while the same record object is alive.

    In simulation every sampled client of a round receives the same ``ArrayRecord`` object, so
    it is decoded once per round; a deployed client receives its own copy and decodes it once.
    The returned tensors are shared: callers copy them into their model, never modify them.
    """
    key = id(record)
    with _decoded_lock:
        entry = _decoded.get(key)
        if entry is not None and entry[0]() is record and entry[1] == codec.name:
            return entry[2]
    state = codec.decode(record, reference)
    with _decoded_lock:
        # ArrayRecord is a mutable mapping (unhashable): key by identity, drop on collection.
        _decoded[key] = (weakref.ref(record, lambda _, k=key: _decoded.pop(k, None)), codec.name, state)
    return state
