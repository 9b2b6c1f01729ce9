"""The ``geometry`` plugin in a run: global summaries, a followed client's shift and flips,
corrupted-input evaluation; and the server-side client replica is the client's own model."""

import math

import torch
from flwr.app import ArrayRecord

from fl.hooks import Report
from fl.run_logger import read_metrics
from plugins.geometry import GeometryMonitor
from tests.helpers import run_inprocess


def test_geometry_plugin_logs_global_client_and_corruption_metrics(tmp_path):
    _, run_dir = run_inprocess(tmp_path, ["plugins=[geometry]", "plugins.geometry.clients=[0,2]",
                                          "plugins.geometry.samples=48", "plugins.geometry.corruptions=true",
                                          "plugins.geometry.severities=[1,5]"])
    rows = read_metrics(run_dir)
    last = rows[-1]
    p = "plugin/geometry/"
    for key in ("global/accuracy", "global/length_mean", "global/angle_std", "global/class3/margin_mean",
                "global/correct/count", "client0/right_to_wrong", "client2/delta_margin",
                "client0/class1/delta_angle", "corrupt/contrast/s5/accuracy", "corrupt/gaussian_blur/s1/margin_mean"):
        assert p + key in last, key
    assert last[p + "global/correct/count"] + last[p + "global/wrong/count"] == 48
    assert last[p + "global/accuracy"] == last[p + "global/correct/count"] / 48
    flips = last[p + "client0/right_to_wrong"], last[p + "client0/wrong_to_right"]
    assert all(f >= 0 and float(f).is_integer() for f in flips)
    assert all(p + "global/length_mean" in r for r in rows if r["round"] > 0)


class ReplicaCheck(GeometryMonitor):
    """Reports how far the plugin's replica of client 0 is from the model the run aggregated."""

    def after_aggregate(self, run, server_round, arrays: ArrayRecord) -> Report:
        replica = self.client_model(run, self._previous, server_round, 0).state_dict()
        self._previous = arrays
        got = arrays.to_torch_state_dict()
        return Report(scalars={"max_abs_diff": max(float((replica[k].float() - got[k].float()).abs().max())
                                                   for k in got)})


def test_client_replica_is_the_model_the_client_trained(tmp_path):
    """With one client per round FedAvg's aggregate is that client's model: the replica matches it."""
    _, run_dir = run_inprocess(tmp_path, ["num_clients=1", "data.partition.name=iid", "~data.partition.classes_per_client", "min_fit_clients=1", "fraction_fit=1.0", "train.lr=0.1",
                                          "train.momentum=0.5", "+plugins.check._target_=tests.test_geometry_plugin.ReplicaCheck",
                                          "+plugins.check.lr=${train.lr}", "+plugins.check.momentum=${train.momentum}",
                                          "+plugins.check.seed=${seed}", "+plugins.check.epochs=${train.epochs}",
                                          "+plugins.check.batch_size=${train.batch_size}"])
    rows = read_metrics(run_dir)
    diffs = [r["plugin/check/max_abs_diff"] for r in rows if r["round"] > 0]
    assert len(diffs) == 2 and all(math.isfinite(d) and d < 1e-6 for d in diffs), diffs
