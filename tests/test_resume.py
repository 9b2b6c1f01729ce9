"""A run killed with SIGKILL mid-round and resumed ends bit-identical to an uninterrupted run,
with every round in metrics.jsonl exactly once; a bad resume leaves the run directory untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fl.run_logger import read_metrics
from tests.helpers import ROOT, run_cli

ARGS = ["num_clients=8", "fraction_fit=0.5", "rounds=4", "checkpoint_every=1", "seed=7", "progress=false",
        "data.samples_per_client=24", "data.test_size=64"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _snapshot(path):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()}


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_is_bit_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_cli(ARGS + [f"hydra.run.dir={full}"]).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "fl.simulate", *ARGS, f"hydra.run.dir={killed}"], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until round 2 is logged and checkpointed: round 3 is under way
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and any(row["round"] == 2 for row in read_metrics(killed)) \
                and (killed / "checkpoint.pt").exists():
            break
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    assert not (killed / "final_model.pt").exists()

    resumed = run_cli([f"resume={killed}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(full / "final_model.pt"), torch.load(killed / "final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_full, rows_resumed = read_metrics(full), read_metrics(killed)
    assert [r["round"] for r in rows_resumed] == [0, 1, 2, 3, 4]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s" and "seconds" not in k} for r in rows]  # noqa: E731
    assert strip(rows_full) == strip(rows_resumed)


def test_resume_without_checkpoint_leaves_directory_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("rounds: 3\n")
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    before = _snapshot(run_dir)
    result = run_cli([f"resume={run_dir}"])
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: resume: no checkpoint at {run_dir / 'checkpoint.pt'}; a run writes one every checkpoint_every "
        "rounds (it must have completed at least one)"]
    assert _snapshot(run_dir) == before


def test_resume_corrupt_checkpoint_leaves_directory_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("rounds: 3\n")
    (run_dir / "checkpoint.pt").write_bytes(b"\x80\x04 not a checkpoint")
    before = _snapshot(run_dir)
    result = run_cli([f"resume={run_dir}"])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreadable" in errors[0] and errors[0].startswith("error: resume:")
    assert _snapshot(run_dir) == before
