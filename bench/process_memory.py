"""Memory of a process and its children, for the benchmarks that watch a run in a subprocess."""

from __future__ import annotations

import psutil


def tree_memory(proc: psutil.Process, measure: str = "rss") -> int:
    """Bytes of ``measure`` summed over ``proc`` and its descendants: ``rss``, or ``pss`` (shared
    pages split among the processes that map them, so a tree is not counted twice)."""
    total = 0
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:  # it has just ended
        return 0
    for p in tree:
        try:
            info = p.memory_full_info() if measure == "pss" else p.memory_info()
            total += getattr(info, measure)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total
