"""Atomic checkpoints of a run, and what resuming from one needs.

A checkpoint (``checkpoint.pt`` in the run directory) holds everything the next round depends on:
the global model, the strategy's ``state_dict()`` (masks, personalized models, tiers, server-side
residuals), the round reporter's running totals, and the persistent ``Context.state`` of every
node where the simulator holds it (the in-process engine; on Ray, Flower keeps node contexts
inside its backend). Sampling and every client's generator are functions of (seed, round,
partition) and need no saved RNG state. It is written to a temporary file, fsynced and renamed,
so a run killed at any instant leaves either the previous checkpoint or the new one, never a
torn file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    reporter: dict[str, Any]
    node_states: dict[int, Any]  # node id -> flwr RecordDict (pickled as is)


def save_checkpoint(run_dir: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, **checkpoint.__dict__}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(run_dir: str | os.PathLike) -> Checkpoint:
    """The last complete checkpoint of ``run_dir``; a clear ``ConfigError`` if there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError("resume", f"no checkpoint at {path}; a run writes one every checkpoint_every rounds "
                                    "(it must have completed at least one)")
    try:
        raw = torch.load(path, weights_only=False)
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
        return Checkpoint(round=int(raw["round"]), arrays=raw["arrays"], strategy=raw["strategy"],
                          reporter=raw["reporter"], node_states=raw["node_states"])
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("resume", f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
                                    "nothing was changed in the run directory") from None
