"""Decoding a broadcast once: every sampled client of a round receives the same record object."""

from __future__ import annotations

import threading
import weakref
from typing import Mapping

import torch
from flwr.app import ArrayRecord

from fl.payload.codec import Codec, State

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
