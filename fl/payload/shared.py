"""Decoding a broadcast once: every sampled client of a round receives the same record object."""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable, Mapping, TypeVar

import torch
from flwr.app import ArrayRecord

from fl.payload.codec import Codec, State

Decoded = TypeVar("Decoded", State, tuple)  # name -> tensor, or a tuple of such mappings


class _Slot:
    """One (record, tag)'s decoded copies: "cpu" and each device's; the lock makes a decode
    that two clients ask for at once happen once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.copies: dict[str, object] = {}


# id(record) -> (the record, {tag: its slot})
_decoded: dict[int, tuple["weakref.ref[ArrayRecord]", dict[Hashable, _Slot]]] = {}
_decoded_lock = threading.Lock()


def shared_decode(record: ArrayRecord, tag: Hashable, decode: Callable[[], Decoded],
                  device: torch.device | None = None) -> Decoded:
    """``decode()`` of ``record``, computed once per record object and ``tag`` while the record is
    alive, and its copy on ``device`` made once too.

    In simulation every sampled client of a round receives the same ``ArrayRecord`` object, so
    its payload is decoded once per round; a deployed client receives its own copy and decodes it
    once. ``tag`` names everything besides the record that the result depends on (the codec; for
    FedDST-like values without a bitmap, the mask version they are read with). ``decode`` returns
    name -> tensor mappings on the CPU (the payload's side, what a reply's update codec subtracts
    from), one or a tuple of them; with an accelerator as ``device``, their copy on it, so the
    round's weights cross to the GPU once per round rather than once per client. (Asked for on the
    CPU only, ``decode`` may build any object to share, e.g. a record several nodes keep.) The
    returned objects are shared: callers copy them into their model, never modify them.
    """
    key = id(record)
    where = "cpu" if device is None or device.type == "cpu" else str(device)
    with _decoded_lock:
        entry = _decoded.get(key)
        if entry is None or entry[0]() is not record:
            # ArrayRecord is a mutable mapping (unhashable): key by identity, drop on collection.
            entry = _decoded[key] = (weakref.ref(record, lambda _, k=key: _decoded.pop(k, None)), {})
        slot = entry[1].setdefault(tag, _Slot())
    with slot.lock:
        if where not in slot.copies:
            if "cpu" not in slot.copies:
                slot.copies["cpu"] = decode()
            if where != "cpu":
                slot.copies[where] = _moved(slot.copies["cpu"], device)
        return slot.copies[where]  # type: ignore[return-value]


def _moved(decoded, device: torch.device):
    if isinstance(decoded, tuple):
        return tuple(_moved(part, device) for part in decoded)
    return {name: tensor.to(device) for name, tensor in decoded.items()}


def decode_shared(codec: Codec, record: ArrayRecord, reference: Mapping[str, torch.Tensor],
                  device: torch.device | None = None) -> State:
    """``codec.decode(record, reference)`` once per record object (``shared_decode``), and its
    copy on ``device`` once."""
    return shared_decode(record, codec.name, lambda: codec.decode(record, reference), device)
