"""Both engines run the same ServerApp/ClientApp and give bit-identical results for one seed."""

import pytest
import torch

from fl.runlog import read_metrics
from tests.helpers import run_inprocess

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
