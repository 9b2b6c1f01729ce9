"""Torch intra-op threads for the central (server-side) training steps.

An engine pins torch's thread count for its clients (``engine.torch_threads``), and float results
depend on the thread count (reductions split differently). A central step that ran at whatever the
process happened to be set to would build a different model under ``fl.simulate`` than under
``python -m fl.delta.pretrain``, behind the same cache key. So the central steps run at an explicit
count, or else at torch's own default for this machine, read when the ``fl`` package is first imported
(``fl/__init__.py`` imports this module, before any engine or test can change it).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

STARTUP_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def central_threads(n: int | None) -> Iterator[None]:
    """Run the block at ``n`` torch threads (torch's startup default when ``n`` is None or 0)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or STARTUP_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)
