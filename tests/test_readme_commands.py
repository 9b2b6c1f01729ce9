"""The README's command blocks marked runnable (```` ```bash runnable ````) run as written, at a reduced
size: each `python -m fl.simulate` or `python -m fl.compare` line gets the overrides of SMALL_RUN
appended (a later override wins in Hydra), except a resume, which takes no other override. The
blocks run one after the other in one scratch folder, so a later line sees an earlier line's runs."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import ROOT, cli_env

# Four clients of 16 synthetic images, one round of one epoch: seconds per run.
SMALL_RUN = ["num_clients=4", "fraction_fit=0.5", "rounds=1", "train.epochs=1", "data.samples_per_client=16",
             "data.test_size=64", "progress=false", "tensorboard=false"]
MODULES = ("fl.simulate", "fl.compare")


def runnable_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash runnable\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """Each line of a block as argv, comments dropped, the reduced size appended."""
    argvs = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[:2] == ["python", "-m"] and words[2] in MODULES, \
            f"a runnable README line must be python -m {' or '.join(MODULES)}: {line}"
        resume = any(w.startswith("resume=") for w in words)
        argvs.append([sys.executable, *words[1:], *([] if resume else SMALL_RUN)])
    return argvs


def test_the_readme_marks_runnable_blocks():
    blocks = runnable_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks and all(commands(block) for block in blocks)


def test_runnable_lines_get_the_reduced_size_except_a_resume():
    block = "python -m fl.simulate rounds=5  # a comment\npython -m fl.simulate resume=runs/x\n"
    first, second = commands(block)
    assert first[-len(SMALL_RUN):] == SMALL_RUN and "rounds=5" in first
    assert second == [sys.executable, "-m", "fl.simulate", "resume=runs/x"]
    with pytest.raises(AssertionError):
        commands("tensorboard --logdir runs\n")


def test_every_runnable_readme_block_runs(tmp_path):
    env = cli_env()
    for block in runnable_blocks((ROOT / "README.md").read_text(encoding="utf-8")):
        for argv in commands(block):
            result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{shlex.join(argv[1:])}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
