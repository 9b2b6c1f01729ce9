"""Model objects that stay resident between rounds in whatever process runs the ClientApp.

Building a model for every message costs more than training it on 50 samples. Each process
(the in-process engine's worker threads, a Ray actor, a SuperNode) keeps a small pool per model
spec; a client borrows an instance, loads the received weights into it and returns it.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator

import torch.nn as nn

_pools: dict[Hashable, "queue.SimpleQueue[nn.Module]"] = {}
_lock = threading.Lock()


@contextmanager
def borrowed_model(key: Hashable, factory: Callable[[], nn.Module]) -> Iterator[nn.Module]:
    with _lock:
        pool = _pools.setdefault(key, queue.SimpleQueue())
    try:
        model = pool.get_nowait()
    except queue.Empty:
        model = factory()
    try:
        yield model
    finally:
        pool.put(model)
