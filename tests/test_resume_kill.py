"""A run killed at any moment resumes to the uninterrupted run's outputs (issue 19, item 1).

Each kill is deterministic: ``FL_TEST_KILL_AT=<point>`` makes the run SIGKILL itself at a named
point (``fl.checkpoint.kill_point``): mid-round, after a round is logged but before its checkpoint,
with a checkpoint or a final file written to its temporary name but not renamed, between the final
model and the summary, and after the outputs but before the checkpoint is removed. A torn last
line of ``metrics.jsonl`` (a kill inside the write) is made by cutting the file. Then
``resume=<dir>`` must give the same final model bytes, the same ``metrics.jsonl`` rows (each round
once) and the same ``summary.json`` apart from wall-clock fields, and leave no checkpoint,
temporary file or error file. SIGTERM and SIGINT stop at a clean point with one line and exit
143/130; a second signal stops at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fl.checkpoint import KILL_AT_ENV, load_checkpoint
from fl.run_logger import read_metrics
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.slow

ARGS = ["num_clients=4", "fraction_fit=0.5", "rounds=3", "checkpoint_every=1", "seed=7", "progress=false",
        "data.samples_per_client=16", "data.test_size=64", "train.epochs=1", "train.batch_size=16"]
TIMING = ("wall_s", "first_train_unix", "first_train_s", "peak_gpu_bytes")  # per process: never equal across two


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != KILL_AT_ENV}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _start(run_dir, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fl.simulate", *ARGS, *args, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _strip(rows):
    return [{k: v for k, v in row.items() if k not in TIMING and "seconds" not in k} for row in rows]


def _summary(run_dir):
    return {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k not in TIMING}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli([*ARGS, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _assert_same_as(reference, run_dir, engine_fields=()):
    """``engine_fields``: summary keys that name the engine (a Ray run's ``engine`` and its
    one-time node-discovery ``control_bytes``)."""
    assert (run_dir / "final_model.pt").read_bytes() == (reference / "final_model.pt").read_bytes()
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert _strip(rows) == _strip(read_metrics(reference))
    ours, theirs = _summary(run_dir), _summary(reference)
    assert {k: v for k, v in ours.items() if k not in engine_fields} == \
        {k: v for k, v in theirs.items() if k not in engine_fields}
    left = sorted(p.name for p in run_dir.iterdir() if p.suffix in (".pt", ".tmp", ".txt") or ".tmp" in p.name)
    assert left == ["final_model.pt"]  # no checkpoint (keep_checkpoint=false), no temporary file, no error.txt


KILL_POINTS = [
    "aggregate:2",            # mid-round: round 2's replies are in, nothing of round 2 is written
    "logged:2",               # round 2 is in metrics.jsonl, its checkpoint is not
    "checkpoint_tmp:2",       # round 2's checkpoint is written to checkpoint.pt.tmp, not renamed
    "checkpointed:3",         # the last round's checkpoint is in place: only the final outputs are left
    "final_model.pt:tmp",     # the final model is written to its temporary name, not renamed
    "before_summary",         # final_model.pt is in place, summary.json is not
    "summary.json:tmp",       # the summary is written to its temporary name, not renamed
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_every_point_then_resume_is_identical(tmp_path, reference, point):
    run_dir = _killed_at(tmp_path, point)
    assert not (run_dir / "summary.json").exists()

    resumed = _resumed(run_dir)
    assert "resuming" in resumed.stdout
    _assert_same_as(reference, run_dir)


def _killed_at(tmp_path, point: str):
    """A run of the small config SIGKILLed by itself at ``point`` (``FL_TEST_KILL_AT``); its folder."""
    run_dir = tmp_path / "run"
    killed = _start(run_dir, **{KILL_AT_ENV: point})
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed at {point}"
    return run_dir


def _resumed(run_dir):
    resumed = run_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed


def test_torn_metrics_line_then_resume_is_identical(tmp_path, reference):
    """A kill inside the write of round 2's row leaves a prefix of that line; the resume drops it."""
    run_dir = _killed_at(tmp_path, "logged:2")
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # half of round 2's line
    with pytest.raises(json.JSONDecodeError):
        read_metrics(run_dir)

    _resumed(run_dir)
    _assert_same_as(reference, run_dir)


def test_killed_after_the_outputs_resume_says_complete(tmp_path, reference):
    run_dir = _killed_at(tmp_path, "finished")
    assert (run_dir / "checkpoint.pt").exists()  # killed before the clean-up

    resumed = _resumed(run_dir)
    assert "is complete" in resumed.stdout and "resuming" not in resumed.stdout
    _assert_same_as(reference, run_dir)  # the leftover checkpoint is gone too

    again = run_cli([f"resume={run_dir}"])
    assert again.returncode == 0 and "is complete" in again.stdout
    _assert_same_as(reference, run_dir)


def test_keep_checkpoint_keeps_the_last_rounds_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*ARGS, "keep_checkpoint=true", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run_dir).round == 3
    assert not list(run_dir.glob("*.tmp"))


def _wait_for(run_dir, predicate, proc, what):
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.parametrize("sig,status,engine", [(signal.SIGTERM, 143, "inprocess"), (signal.SIGINT, 130, "inprocess"),
                                               (signal.SIGTERM, 143, "ray")])
def test_signal_stops_at_a_clean_point_then_resume_is_identical(tmp_path, reference, sig, status, engine):
    """On Ray too: ``ray.init`` takes SIGTERM over (``sys.exit``, abseil's 3-second abort) unless
    the engine puts the run's handler back (fl.engine.ray_sim)."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, f"engine={engine}")
    _wait_for(run_dir, lambda: any(r["round"] == 1 for r in _rows(run_dir)), proc, "round 1 was logged")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-3000:]
    assert "Traceback" not in err
    stopped = [line for line in (out + err).splitlines() if line.startswith("stopped")]
    assert len(stopped) == 1 and not any(line.startswith("error:") for line in err.splitlines())
    r = load_checkpoint(run_dir).round
    assert stopped[0] == f"stopped at round {r}; resume with: python -m fl.simulate resume={run_dir}"
    assert 1 <= r <= 3
    assert [row["round"] for row in read_metrics(run_dir)] == list(range(r + 1))
    assert not (run_dir / "error.txt").exists() and not (run_dir / "summary.json").exists()

    resumed = run_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as(reference, run_dir, ("engine", "control_bytes") if engine == "ray" else ())


def test_second_signal_stops_at_once_at_the_last_checkpoint(tmp_path, reference):
    """SIGINT twice (Ctrl-C, Ctrl-C) does not wait for the round: the last checkpoint stands."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "rounds=3", "checkpoint_every=1")
    _wait_for(run_dir, lambda: (run_dir / "checkpoint.pt").exists(), proc, "the first checkpoint")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    stopped = [line for line in (out + err).splitlines() if line.startswith("stopped")]
    r = load_checkpoint(run_dir).round
    assert stopped == [f"stopped at round {r}; resume with: python -m fl.simulate resume={run_dir}"]
    assert not (run_dir / "error.txt").exists()

    resumed = run_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as(reference, run_dir)


def _rows(run_dir):
    try:
        return read_metrics(run_dir)
    except json.JSONDecodeError:  # a line being written
        return []
