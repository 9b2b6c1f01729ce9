"""Finished runs as the comparison reads them: a label and the rows of ``metrics.jsonl``.

A run directory counts when it holds ``metrics.jsonl`` (or Hydra's ``.hydra/``); it must have
completed (``summary.json``), not failed (``error.txt``), and have evaluated accuracy. Anything else
is a ``ConfigError`` naming the directory, so a comparison never draws half of a sweep silently.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from fl.errors import ConfigError

METRICS_FILE = "metrics.jsonl"  # written by fl.run_logger.RunLogger, one JSON object per round
SUMMARY_FILE = "summary.json"   # written by fl.outputs when a run completes
ERROR_FILE = "error.txt"        # written by fl.simulate when a run fails
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
ARM_KEYS = ("arm", "+arm", "++arm")


@dataclass(frozen=True)
class Run:
    """One finished run: ``rows`` are its ``metrics.jsonl`` objects in round order."""

    label: str
    path: Path
    rows: list[dict[str, Any]] = field(repr=False)

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """The rows with a central accuracy (rounds skipped by ``eval_every`` have ``null``)."""
        return [r for r in self.rows if r.get("accuracy") is not None]


def find_runs(sweep_dir: str | os.PathLike) -> list[Path]:
    """The run directories directly under a sweep folder, in job order (``0_...``, ``1_...``, ``10_...``)."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise ConfigError("--from", f"{sweep} is not a directory")
    found = [p for p in sweep.iterdir() if p.is_dir() and ((p / METRICS_FILE).is_file() or (p / ".hydra").is_dir())]
    if not found:
        raise ConfigError("--from", f"no runs under {sweep} (no sub-directory with {METRICS_FILE}); "
                                    f"run the comparison with python -m fl.compare, or name run directories with --runs")
    return sorted(found, key=_job_order)


def load_runs(dirs: Sequence[str | os.PathLike], labels: Sequence[str] | None = None) -> list[Run]:
    """Read and check every run; labels default to what tells the runs apart (``label_runs``)."""
    paths = [Path(d) for d in dirs]
    if not paths:
        raise ConfigError("--runs", "no run directories given")
    rows = [_read_finished(p) for p in paths]
    names = list(labels) if labels is not None else label_runs(paths)
    return [Run(label, path, r) for label, path, r in zip(names, paths, rows)]


def label_runs(paths: Sequence[Path]) -> list[str]:
    """A short label per run: its arm (``+arm=...``) and the overrides that differ between the runs,
    from Hydra's ``.hydra/overrides.yaml``; the directory name when nothing tells them apart."""
    overrides = [_overrides(p) for p in paths]
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1 or k.lstrip("+") == "arm"]
    labels = []
    for path, mine in zip(paths, overrides):
        parts = [mine[k] if k in ARM_KEYS else f"{k}={mine[k]}" for k in varying if k in mine]
        labels.append(", ".join(parts) or path.name)
    counts = {label: labels.count(label) for label in labels}
    return [f"{label} ({path.name})" if counts[label] > 1 else label for label, path in zip(labels, paths)]


def _read_finished(path: Path) -> list[dict[str, Any]]:
    if not path.is_dir():
        raise ConfigError("--runs", f"{path} is not a directory")
    if (path / ERROR_FILE).is_file():
        first = (path / ERROR_FILE).read_text(encoding="utf-8").strip().splitlines()[:1]
        raise ConfigError("runs", f"{path} failed ({first[0] if first else ERROR_FILE}); fix it or leave it out")
    if not (path / METRICS_FILE).is_file():
        raise ConfigError("runs", f"{path} is not a run directory (no {METRICS_FILE})")
    if not (path / SUMMARY_FILE).is_file():
        raise ConfigError("runs", f"{path} did not finish (no {SUMMARY_FILE}); resume it with "
                                  f"python -m fl.simulate resume={path}, or leave it out")
    lines = (path / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    try:
        rows = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError("runs", f"{path / METRICS_FILE}: not JSON lines ({err})") from None
    needed = ("round", "cum_up_bytes", "cum_down_bytes")
    if not all(k in r for r in rows for k in needed) or not any(r.get("accuracy") is not None for r in rows):
        raise ConfigError("runs", f"{path / METRICS_FILE}: no evaluated rounds with cumulative bytes")
    return sorted(rows, key=lambda r: r["round"])


def _overrides(path: Path) -> dict[str, str]:
    file = path / OVERRIDES_FILE
    if not file.is_file():
        return {}
    items = yaml.safe_load(file.read_text(encoding="utf-8")) or []
    return dict(str(item).split("=", 1) for item in items if "=" in str(item))


def _job_order(path: Path) -> tuple[int, str]:
    match = re.match(r"(\d+)_", path.name)
    return (int(match.group(1)) if match else 1 << 30, path.name)
