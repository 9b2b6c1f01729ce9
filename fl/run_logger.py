"""The run logger: the one home for what a run writes (TensorBoard events and ``metrics.jsonl``).

Per evaluated round it writes one JSON line (keys documented in docs/run-directory.md) and these
TensorBoard series:
    eval/accuracy, eval/loss                          step = round
    comm/up_bytes, comm/down_bytes, comm/cum_up_bytes, comm/cum_down_bytes   step = round
    comm/up_bytes_per_client (histogram)              step = round
    comm/failures, comm/rejected, comm/stragglers, comm/sim_s   step = round
    acc_vs_kib/total, acc_vs_kib/up                   step = cumulative KiB (total, upload only)
    acc_vs_sim_time/accuracy                          step = cumulative simulated seconds (with a clock)
so that accuracy curves of different strategies overlay on one chart by communication cost.
Plugins' reports land under ``plugin/<name>/``; each image of a report is also written as a PNG
file, ``images/<plugin>/<key>_round<step>.png`` in the run directory (``/`` in a key becomes
``-``), with or without TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fl.hooks import Report
from fl.outputs import atomic_write_text

METRICS_FILE = "metrics.jsonl"
IMAGES_DIR = "images"


class RunLogger:
    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tensorboard = tensorboard
        self._purge_step = purge_step  # a resumed run drops the killed run's events from that round on
        self._writer = None

    @property
    def _tb(self):
        """The SummaryWriter, opened at the first write: importing TensorBoard stays off the path
        to the first client's training."""
        if self._writer is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=self._purge_step)
        return self._writer

    def log_round(self, row: Mapping[str, Any], per_client_up: np.ndarray | None = None) -> None:
        self._metrics.write(json.dumps(_jsonable(row)) + "\n")
        self._metrics.flush()
        if not self._tensorboard:
            return
        step = int(row["round"])
        for key in ("accuracy", "loss"):
            if row.get(key) is not None:
                self._tb.add_scalar(f"eval/{key}", row[key], step)
        for key in ("up_bytes", "down_bytes", "cum_up_bytes", "cum_down_bytes", "failures", "rejected", "stragglers",
                    "sim_s"):
            if key not in row:
                continue
            self._tb.add_scalar(f"comm/{key}", row[key], step)
        if per_client_up is not None and len(per_client_up):
            self._tb.add_histogram("comm/up_bytes_per_client", per_client_up, step)
        if row.get("accuracy") is not None:
            total_kib = (row["cum_up_bytes"] + row["cum_down_bytes"]) / 1024
            self._tb.add_scalar("acc_vs_kib/total", row["accuracy"], int(total_kib))
            self._tb.add_scalar("acc_vs_kib/up", row["accuracy"], int(row["cum_up_bytes"] / 1024))
            if "cum_sim_s" in row:
                self._tb.add_scalar("acc_vs_sim_time/accuracy", row["accuracy"], int(row["cum_sim_s"]))
        for key, value in row.items():
            if key.startswith(("train/", "fed_eval/", "eval/")) and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def log_report(self, plugin: str, report: Report | None, step: int) -> dict[str, float]:
        """Write a plugin's report; returns its scalars under their logged names."""
        if report is None:
            return {}
        scalars = {f"plugin/{plugin}/{k}": float(v) for k, v in report.scalars.items()}
        if self._tensorboard:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            for key, values in report.histograms.items():
                self._tb.add_histogram(f"plugin/{plugin}/{key}", np.asarray(values), step)
            for key, image in report.images.items():
                self._tb.add_image(f"plugin/{plugin}/{key}", np.asarray(image), step, dataformats="HWC")
            for key, text in report.text.items():
                self._tb.add_text(f"plugin/{plugin}/{key}", text, step)
            self._tb.flush()
        for name, text in report.files.items():
            if Path(name).name != name:
                raise ValueError(f"plugin {plugin}: a report file is a plain name in the run directory, got {name!r}")
            atomic_write_text(self.run_dir / name, text)
        if report.images:
            self._write_pngs(plugin, report.images, step)
        return scalars

    def _write_pngs(self, plugin: str, images: Mapping[str, np.ndarray], step: int) -> None:
        from fl.figures import write_png  # matplotlib and Pillow load only for a run that draws

        for key, image in images.items():
            path = image_path(self.run_dir, plugin, key, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(image, path)

    def close(self) -> None:
        self._metrics.close()
        if self._writer is not None:
            self._writer.close()


def image_path(run_dir: str | os.PathLike, plugin: str, key: str, step: int) -> Path:
    """Where ``log_report`` writes a plugin's image ``key`` of round ``step`` as a PNG file."""
    return Path(run_dir) / IMAGES_DIR / plugin / f"{key.replace('/', '-')}_round{int(step):04d}.png"


def truncate_metrics(run_dir: str | os.PathLike, last_round: int) -> None:
    """Keep the rows up to ``last_round`` (a resumed run writes the later rounds again), atomically."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["round"] <= last_round]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, (np.integer,)):
            value = int(value)
        elif isinstance(value, (np.floating, float)):
            value = float(value)
            if not math.isfinite(value):
                value = None
        out[key] = value
    return out
