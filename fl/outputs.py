"""What a finished run leaves behind, written atomically (docs/run-directory.md).

``final_model.pt`` and ``summary.json`` are written only when a run completes, each to a temporary
file that is fsynced and then renamed, so a crashed run never leaves a torn final model or summary
behind. ``summary.json`` is written last: a run directory holding it is complete
(``outputs_complete``), and one killed between the two writes is finished by ``resume=<dir>``.
The same atomic writes serve the DELTA caches (``fl.delta``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from fl.checkpoint import kill_point

SUMMARY_FILE = "summary.json"
FINAL_MODEL_FILE = "final_model.pt"
ERROR_FILE = "error.txt"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file, fsync and a rename."""
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def outputs_complete(run_dir: str | os.PathLike) -> bool:
    """Whether a run directory holds its final outputs (``summary.json`` is written after the model)."""
    return (Path(run_dir) / SUMMARY_FILE).is_file() and (Path(run_dir) / FINAL_MODEL_FILE).is_file()


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    kill_point(f"{path.name}:tmp")  # test hook: the new file is written, not yet in place
    os.replace(tmp, path)


def write_results(run_dir: str | os.PathLike, rounds: int, outcome: Any, started: float, engine: str,
                  **extra: Any) -> dict[str, Any]:
    """Write ``final_model.pt`` and ``summary.json`` for a completed run; returns the summary.

    ``outcome`` is the server's ``RunOutcome`` (final arrays, per-round rows, control bytes);
    ``extra`` adds engine-specific fields (first-train timing on the simulator's engines).
    """
    run_dir = Path(run_dir)
    atomic_save(outcome.final_arrays.to_torch_state_dict(), run_dir / FINAL_MODEL_FILE)
    kill_point("before_summary")  # test hook: the final model is in place, the summary is not
    evaluated = [r for r in outcome.rows if r["accuracy"] is not None]
    last = outcome.rows[-1]
    summary = {
        "status": "complete",
        "rounds": rounds,
        "final_accuracy": evaluated[-1]["accuracy"],
        "final_loss": evaluated[-1]["loss"],
        "best_accuracy": max(r["accuracy"] for r in evaluated),
        "cum_up_bytes": last["cum_up_bytes"],
        "cum_down_bytes": last["cum_down_bytes"],
        "control_bytes": outcome.control_bytes,
        "wall_s": round(time.time() - started, 3),
        "engine": engine,
        **extra,
    }
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary
