"""What a finished run leaves behind, written atomically (README, "Run directory").

``final_model.pt`` and ``summary.json`` are written only when a run completes, each to a temporary
file that is then renamed, so a crashed run never leaves a final model or a summary behind. The
same atomic writes serve the DELTA caches (``fl.delta``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

SUMMARY_FILE = "summary.json"
FINAL_MODEL_FILE = "final_model.pt"
ERROR_FILE = "error.txt"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(run_dir: str | os.PathLike, rounds: int, outcome: Any, started: float, engine: str,
                  **extra: Any) -> dict[str, Any]:
    """Write ``final_model.pt`` and ``summary.json`` for a completed run; returns the summary.

    ``outcome`` is the server's ``RunOutcome`` (final arrays, per-round rows, control bytes);
    ``extra`` adds engine-specific fields (first-train timing on the simulator's engines).
    """
    run_dir = Path(run_dir)
    atomic_save(outcome.final_arrays.to_torch_state_dict(), run_dir / FINAL_MODEL_FILE)
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
