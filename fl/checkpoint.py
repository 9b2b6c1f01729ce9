"""Atomic checkpoints of a run, and what resuming from one needs.

A checkpoint (``checkpoint.pt`` in the run directory) holds everything the next round depends on:
the global model, the strategy's ``state_dict()`` (masks, personalized models, tiers, server-side
residuals), the round reporter's running totals, and the persistent ``Context.state`` of every
node where the simulator holds it (the in-process engine; on Ray, Flower keeps node contexts
inside its backend). Sampling and every client's generator are functions of (seed, round,
partition) and need no saved RNG state. It is written to a temporary file, fsynced and renamed,
so a run killed at any instant leaves either the previous checkpoint or the new one, never a
torn file.

``kill_point(name)`` is a test hook: with the environment variable ``FL_TEST_KILL_AT=name`` the
process kills itself with SIGKILL at that point (``tests/test_resume_kill.py`` names every point
where a file is being written). It costs one dictionary look-up when unset.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1
KILL_AT_ENV = "FL_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process here when ``FL_TEST_KILL_AT`` equals ``name`` (a test hook; see the module doc)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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
    kill_point(f"checkpoint_tmp:{checkpoint.round}")  # the new file is written, not yet in place
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
        raw = torch.load(path, map_location="cpu", weights_only=False)  # loads on any machine
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
        return Checkpoint(round=int(raw["round"]), arrays=raw["arrays"], strategy=raw["strategy"],
                          reporter=raw["reporter"], node_states=raw["node_states"])
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("resume", f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
                                    "nothing was changed in the run directory") from None


def remove_checkpoint(run_dir: str | os.PathLike) -> None:
    """Delete ``checkpoint.pt`` and any temporary file a killed write left beside it."""
    path = Path(run_dir) / CHECKPOINT_FILE
    for stale in (path, path.with_suffix(".pt.tmp")):
        stale.unlink(missing_ok=True)
