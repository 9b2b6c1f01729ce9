"""Decoding a broadcast once: every sampled client of a round receives the same record object."""

from __future__ import annotations

import threading
import weakref
from typing import Mapping

import torch
from flwr.app import ArrayRecord

from fl.payload.codec import Codec, State

_decoded: dict[int, tuple["weakref.ref[ArrayRecord]", str, dict[str, State]]] = {}  # id -> (record, codec, copies)
_decoded_lock = threading.Lock()


def decode_shared(codec: Codec, record: ArrayRecord, reference: Mapping[str, torch.Tensor],
                  device: torch.device | None = None) -> State:
    """Decode ``record``, reusing the result while the same record object is alive.

    In simulation every sampled client of a round receives the same ``ArrayRecord`` object, so
    it is decoded once per round; a deployed client receives its own copy and decodes it once.
    The decoded tensors are on the CPU (the payload's side, what a reply's update codec subtracts
    from); with an accelerator as ``device``, their copy on it, made once per record too, so the
    round's global weights cross to the GPU once per round rather than once per client. The
    returned tensors are shared: callers copy them into their model, never modify them.
    """
    key = id(record)
    where = "cpu" if device is None or device.type == "cpu" else str(device)
    with _decoded_lock:
        entry = _decoded.get(key)
        copies = entry[2] if entry is not None and entry[0]() is record and entry[1] == codec.name else None
        if copies is not None and where in copies:
            return copies[where]
    if copies is None:
        copies = {"cpu": codec.decode(record, reference)}
        with _decoded_lock:
            # ArrayRecord is a mutable mapping (unhashable): key by identity, drop on collection.
            _decoded[key] = (weakref.ref(record, lambda _, k=key: _decoded.pop(k, None)), codec.name, copies)
    if where == "cpu":
        return copies["cpu"]
    moved = {name: tensor.to(device) for name, tensor in copies["cpu"].items()}
    with _decoded_lock:
        return copies.setdefault(where, moved)
