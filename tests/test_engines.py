"""Both engines run the same ServerApp/ClientApp and give bit-identical results for one seed, on a
local Ray and on a Ray cluster started for the test."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

from fl.run_logger import read_metrics
from tests.helpers import SMALL, SMALL_SYNTHETIC, run_inprocess

pytestmark = pytest.mark.slow  # starts a local Ray (about 30 s); run by .ci/run


def _comparable(rows):
    return [{k: v for k, v in r.items() if k != "wall_s" and "seconds" not in k} for r in rows]


@pytest.mark.parametrize("strategy", [
    [],  # FedAvg
    ["strategy=feddst", "strategy.r_adj=1", "strategy.r_end=2"],  # sparse: masks readjusted on the clients, in Context.state
])
def test_inprocess_and_ray_identical(tmp_path, strategy):
    overrides = ["seed=5", "rounds=2", *strategy]
    _, dir_a = run_inprocess(tmp_path / "inprocess", overrides + ["engine=inprocess"])
    summary, dir_b = run_inprocess(tmp_path / "ray", overrides + ["engine=ray"])
    assert summary["engine"] == "ray"
    a, b = torch.load(dir_a / "final_model.pt"), torch.load(dir_b / "final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _comparable(read_metrics(dir_a)) == _comparable(read_metrics(dir_b))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(temp_dir: str) -> None:
    """Stop the processes of the cluster this test started (their command lines name its temp dir)
    and none other: ``ray stop`` would stop every Ray on the machine."""
    import psutil

    ours = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in part for part in p.info["cmdline"] or [])]
    for process in ours:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(ours, timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def test_a_real_ray_cluster_gives_the_inprocess_result(tmp_path):
    """``ray start --head`` on 127.0.0.1, then ``python -m fl.simulate engine=ray ray.address=...``: the
    final model is bit-identical to ``engine=inprocess`` with the same seed."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, timeout=180, env=env, capture_output=True)
    try:
        overrides = ["seed=5", "rounds=2"]
        _, dir_a = run_inprocess(tmp_path / "inprocess", overrides + ["engine=inprocess"])
        dir_b = tmp_path / "cluster"
        done = subprocess.run([sys.executable, "-m", "fl.simulate", *SMALL, *SMALL_SYNTHETIC, *overrides, "engine=ray",
                               f"ray.address=127.0.0.1:{port}", f"hydra.run.dir={dir_b}"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        a, b = torch.load(dir_a / "final_model.pt"), torch.load(dir_b / "final_model.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert _comparable(read_metrics(dir_a)) == _comparable(read_metrics(dir_b))
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
