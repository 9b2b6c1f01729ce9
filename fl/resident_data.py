"""A client's samples kept on the compute device between rounds, for runs on a GPU.

Without it every minibatch of every round is gathered and normalized on the CPU and copied to the
device. ``device_batches`` instead gathers a client's whole data once per process, moves it to the
device and keeps it there (``ResidentCache``); each minibatch is then an index on the device. When
the device's budget is spent (``budget_share`` of its memory, counted over what this process made
resident), later clients are gathered per batch into pinned host memory and copied with
``non_blocking=True``, so the copy overlaps the previous step's kernels.

On the CPU nothing is cached (``fl.local_training.ClientData.batches`` gathers per batch as it
always has): holding every client's samples would break the million-client memory bound.

The order is the CPU path's: one ``torch.randperm(n, generator=...)`` per epoch, the same draw, and
the batch bounds of ``fl.local_training.batch_bounds``; ``ImageSet.get`` is a pure function of the
index, so a resident batch holds the same values as a gathered one.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor


class ResidentCache:
    """Per process: (image set, client indices, device) -> the client's images and labels on the device."""

    def __init__(self, budget_share: float = 0.5, free_memory: Callable[[torch.device], tuple[int, int]] | None = None):
        self.budget_share = budget_share
        self._free_memory = free_memory or _cuda_memory
        self._entries: dict[tuple, tuple[weakref.ref, Tensor, Tensor, int]] = {}
        self._held: dict[str, int] = {}  # bytes made resident, per device
        self._lock = threading.Lock()

    def samples(self, images, indices: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """The client's (images, labels) on ``device``, made on first use; None when they do not fit."""
        key = (str(device), id(images), len(indices),
               hashlib.blake2b(np.ascontiguousarray(indices).tobytes(), digest_size=16).digest())
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is images:
                return entry[1], entry[2]
            self._drop_dead()
        x, y = images.get(indices)
        size = x.element_size() * x.nelement() + y.element_size() * y.nelement()
        with self._lock:
            held = self._held.get(str(device), 0)
            free, total = self._free_memory(device)
            if held + size > self.budget_share * total or size > free:
                return None
            x, y = x.to(device), y.to(device)
            self._entries[key] = (weakref.ref(images), x, y, size)
            self._held[str(device)] = held + size
        return x, y

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._held.clear()

    def held(self, device: torch.device) -> int:
        """Bytes this process keeps resident on ``device``."""
        return self._held.get(str(device), 0)

    def _drop_dead(self) -> None:
        """Forget the samples of image sets that no longer exist (an earlier run in this process)."""
        for key in [k for k, entry in self._entries.items() if entry[0]() is None]:
            size = self._entries.pop(key)[3]
            self._held[key[0]] -= size


def _cuda_memory(device: torch.device) -> tuple[int, int]:
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


CACHE = ResidentCache()


def client_samples(images, indices: np.ndarray, device: torch.device,
                   cache: ResidentCache = CACHE) -> tuple[Tensor, Tensor]:
    """The client's whole (images, labels) on ``device``: its resident copy, or, when that does not
    fit, gathered and copied for this call only."""
    resident = cache.samples(images, indices, device)
    if resident is not None:
        return resident
    x, y = images.get(indices)
    return x.to(device), y.to(device)


def device_batches(images, indices: np.ndarray, bounds: list[tuple[int, int]], order: Tensor | None,
                   device: torch.device, cache: ResidentCache = CACHE) -> Iterator[tuple[Tensor, Tensor]]:
    """Minibatches ``[start, end)`` of ``bounds`` over the client's samples taken in ``order`` (a
    permutation of positions in ``indices``; None: stored order), on ``device``."""
    resident = cache.samples(images, indices, device)
    if resident is not None:
        x_all, y_all = resident
        order_on = None if order is None else order.to(x_all.device)
        for start, end in bounds:
            if order_on is None:
                yield x_all[start:end], y_all[start:end]
            else:
                pick = order_on[start:end]
                yield x_all.index_select(0, pick), y_all.index_select(0, pick)
        return
    pin = torch.cuda.is_available()
    positions = np.arange(len(indices)) if order is None else order.numpy()
    for start, end in bounds:
        x, y = images.get(indices[positions[start:end]])
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        yield x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
