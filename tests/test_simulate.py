"""End-to-end: `fl.simulate` runs FedAvg, writes the run directory contract, counts exact bytes,
takes a user's strategy and plugin from one file each, and rejects bad input with one line."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from fl.hooks import Plugin, Report
from fl.payload import payload_bytes
from fl.run_logger import read_metrics
from strategies import FedAvg
from tests.helpers import SMALL, run_cli, run_inprocess

ROW_KEYS = {"round", "accuracy", "loss", "up_bytes", "down_bytes", "cum_up_bytes", "cum_down_bytes", "clients", "wall_s"}


def test_fedavg_run_directory_contract(tmp_path):
    summary, run_dir = run_inprocess(tmp_path, ["tensorboard=true"])
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert rows[-1]["cum_up_bytes"] == sum(r["up_bytes"] for r in rows)
    assert summary["status"] == "complete" and summary["final_accuracy"] == rows[-1]["accuracy"]
    state = torch.load(run_dir / "final_model.pt")
    assert "classifier.weight" in state
    assert list(run_dir.glob("events.out.tfevents.*"))


def test_fedavg_bytes_equal_serialized_model(tmp_path):
    """Per client and round: up = the model's ArrayRecord + the reply metrics; down = model + config."""
    from fl.models import get_model

    _, run_dir = run_inprocess(tmp_path, [])
    model_bytes = ArrayRecord(get_model("cnn_small", num_classes=10).state_dict()).count_bytes()
    rows = read_metrics(run_dir)[1:]
    for row in rows:
        assert row["clients"] == 3
        per_client_up = row["up_bytes"] / row["clients"]
        per_client_down = row["down_bytes"] / row["clients"]
        # The model dominates; the rest is the MetricRecord / ConfigRecord and the record keys.
        assert model_bytes < per_client_up < model_bytes + 300
        assert model_bytes < per_client_down < model_bytes + 300


def test_same_seed_same_result_and_different_seed_differs(tmp_path):
    a, dir_a = run_inprocess(tmp_path / "a", ["seed=3"])
    b, dir_b = run_inprocess(tmp_path / "b", ["seed=3"])
    c, dir_c = run_inprocess(tmp_path / "c", ["seed=4"])
    state_a, state_b, state_c = (torch.load(d / "final_model.pt") for d in (dir_a, dir_b, dir_c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s",) and "seconds" not in k} for r in rows]  # noqa: E731
    assert strip(read_metrics(dir_a)) == strip(read_metrics(dir_b))


# -- a user's own strategy: one class in one file, one override ----------------------------------

class TrimmedFedAvg(FedAvg):
    """Drops the client whose update is farthest from the mean before averaging (a toy variant)."""

    calls = 0

    def __init__(self, *, drop: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.drop = drop

    def server_update(self, server_round, states, weights):
        TrimmedFedAvg.calls += 1
        mean = super().server_update(server_round, states, weights)
        dist = [sum(float((s[k].float() - mean[k].float()).norm()) for k in mean) for s in states]
        keep = sorted(range(len(states)), key=dist.__getitem__)[: len(states) - self.drop]
        return super().server_update(server_round, [states[i] for i in keep], [weights[i] for i in keep])


def test_user_strategy_from_test_file(tmp_path):
    TrimmedFedAvg.calls = 0
    summary, _ = run_inprocess(tmp_path, ["strategy._target_=tests.test_simulate.TrimmedFedAvg", "+strategy.drop=1"])
    assert TrimmedFedAvg.calls == 2
    assert summary["status"] == "complete"


# -- a user's own plugin ---------------------------------------------------------------------------

class CountingPlugin(Plugin):
    events: list = []

    def __init__(self, tag: str = "x"):
        self.tag = tag

    def on_run_start(self, run):
        CountingPlugin.events.append("start")

    def after_aggregate(self, run, server_round, arrays):
        CountingPlugin.events.append(f"agg{server_round}")
        return Report(scalars={"n_arrays": len(arrays)})

    def after_train(self, client, model, metrics):
        CountingPlugin.events.append("client")
        return {"seen": 1.0}

    def on_run_end(self, run):
        CountingPlugin.events.append("end")


def test_user_plugin_from_test_file(tmp_path):
    CountingPlugin.events = []
    _, run_dir = run_inprocess(tmp_path, ["+plugins.counting._target_=tests.test_simulate.CountingPlugin",
                                          "+plugins.counting.tag=y", "plugins=[update_norms]"])
    events = CountingPlugin.events
    assert events[0] == "start" and events[-1] == "end"
    assert events.count("client") == 6 and "agg1" in events and "agg2" in events
    rows = read_metrics(run_dir)
    assert rows[1]["plugin/counting/n_arrays"] > 0
    assert rows[1]["train/plugin/counting/seen"] == 1.0
    assert rows[1]["plugin/update_norms/update_l2"] > 0


def test_startup_imports_only_what_the_run_uses():
    """Plugins are declared, not imported: a plain run never loads captum (about 1 s here), and
    TensorBoard loads at the first write, after the first clients have started."""
    import subprocess
    import sys

    probe = ("import sys, fl.config, fl.execute; from fl.hooks import PLUGINS; "
             "before = [m for m in ('captum', 'torch.utils.tensorboard') if m in sys.modules]; "
             "names = PLUGINS.names(); PLUGINS.get('xdelta'); print(before, names, 'captum' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['agilenn', 'compression', 'geometry', 'update_norms', 'xdelta'] True"


# -- bad input: one line naming the key, non-zero exit, nothing left behind --------------------------

@pytest.mark.parametrize("override,key", [
    ("fraction_fit=1.5", "fraction_fit"),
    ("fraction_fit=0", "fraction_fit"),
    ("min_fit_clients=50", "min_fit_clients"),
    ("model.name=resnet1000", "model.name"),
    ("data.name=imagenet77", "data.name"),
    ("strategy._target_=nowhere.Strategy", "strategy._target_"),
    ("strategy=feddst strategy.sparsity=1.5", "strategy.sparsity"),
])
def test_bad_input_one_clear_error(tmp_path, override, key):
    run_dir = tmp_path / "run"
    result = run_cli(["num_clients=10", "rounds=1", *override.split(), f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:")
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides,start", [
    ([], "error: plugins: xdelta explains a fused edge+DELTA model"),
    (["plugins.xdelta.delta_map_size=-1"], "error: plugins.xdelta: xdelta.delta_map_size must be >= 0"),
])
def test_a_plugin_refusing_its_options_or_the_model_stops_the_run_before_round_1(tmp_path, overrides, start):
    """xdelta needs model=delta and valid options: its constructor's and its run-start checks are one
    error line and exit 2, before round 1, and leave no run folder (issue 19: bad input is refused
    before any work; the run-start check used to leave error.txt and metrics.jsonl behind)."""
    run_dir = tmp_path / "run"
    result = run_cli(["num_clients=4", "rounds=1", "plugins=[xdelta]", *overrides, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(start)
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_unknown_strategy_group_option_fails(tmp_path):
    result = run_cli(["strategy=nosuch", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode != 0
    assert "nosuch" in result.stderr and "fedavg" in result.stderr


def test_absent_dataset_files_one_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["data=cifar10", f"data.root={tmp_path / 'nothing'}", "data.download=false", "num_clients=10",
                      f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: data.root:") and "cifar-10-batches-py" in lines[0]
    assert not run_dir.exists()


def test_mnist_from_official_test_files(tmp_path):
    """`data=mnist data.root=../shared/data` works offline from the 10,000 official test images."""
    from tests.helpers import ROOT

    root = ROOT.parent / "shared" / "data"
    if not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"the official MNIST test files are expected under {root}")
    summary, run_dir = run_inprocess(tmp_path, ["data=mnist", f"data.root={root}", "num_clients=20",
                                                "fraction_fit=0.8", "rounds=2"])
    assert summary["status"] == "complete"
    rows = read_metrics(run_dir)
    assert rows[-1]["accuracy"] > 0.2  # 10 classes: well above chance after two rounds on real digits


# -- what a completed run leaves: only what a user needs, each file and key in docs/run-directory.md --

def _run_directory_section() -> str:
    from tests.helpers import ROOT

    text = (ROOT / "docs" / "run-directory.md").read_text(encoding="utf-8")
    return text[:text.index("## How bytes are counted")]


def test_completed_run_keeps_no_checkpoint_and_the_docs_list_every_file_and_key(tmp_path):
    import fnmatch
    import re

    from tests.helpers import SMALL_SYNTHETIC

    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, *SMALL_SYNTHETIC, "checkpoint_every=1", "tensorboard=true", "plugins=[update_norms]",
                      f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (run_dir / "checkpoint.pt").exists()  # removed once the outputs are written (keep_checkpoint=false)
    section = _run_directory_section()
    documented = [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", section, flags=re.M)]
    for entry in run_dir.iterdir():
        name = entry.name + ("/" if entry.is_dir() else "")
        assert any(fnmatch.fnmatch(name, pattern) for pattern in documented), f"{name} is not in the table of docs/run-directory.md"
    keys = {key for row in read_metrics(run_dir) for key in row}
    for key in keys:
        generic = re.sub(r"^(train|fed_eval|eval|plugin/[^/]+)/.*$", r"\1/<metric>", key)
        generic = generic.replace("plugin/update_norms/<metric>", "plugin/<name>/<metric>")
        assert f"`{key}`" in section or f"`{generic}`" in section, f"metrics key {key} is not in the table of docs/run-directory.md"
