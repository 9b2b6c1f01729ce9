"""Every strategy screens every reply before its own aggregation step (strategies/base.py): a client
that uploads NaN, lies about an array's shape in the metadata, or claims NaN examples is refused
with a logged reason, and the run completes with a finite model. Robust bounds stop a client whose
weights or ``num-examples`` are orders of magnitude off."""

import json
import logging

import pytest
import torch

from fl.faults import FaultSpec
from strategies.base import FederatedStrategy
from tests.golden import TINY_DELTA
from tests.helpers import ROOT, run_inprocess

STRATEGIES = {
    "fedavg": [],
    "feddst": ["strategy=feddst"],
    "hermes": ["strategy=hermes"],
    "delta": ["sim=delta_100clients", "num_clients=6", "fraction_fit=0.5", *TINY_DELTA],
    "agilenn": ["plugins=[agilenn]", "strategy.pretrain_rounds=1", "plugins.agilenn.samples=32", "data.test_size=32"],
}
ATTACKS = {"nan": ["faults.nan=1.0"], "misshapen": ["faults.hostile=0.5", "faults.hostile_kind=misshapen"],
           "nan_examples": ["faults.hostile=0.5", "faults.hostile_kind=nan_examples"]}
REASONS = {"nan": "non-finite", "misshapen": "shape", "nan_examples": "'num-examples' is nan"}


@pytest.fixture(scope="module")
def delta_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("delta-cache")


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_hostile_reply_is_refused_with_its_reason_and_the_run_completes(strategy, attack, tmp_path, caplog,
                                                                         delta_cache):
    overrides = [*STRATEGIES[strategy], *ATTACKS[attack], "rounds=2"]
    if strategy == "delta":
        overrides.append(f"model.cache_dir={delta_cache}")
    with caplog.at_level(logging.WARNING, logger="strategies.base"):
        summary, run_dir = run_inprocess(tmp_path / "run", overrides)
    assert summary["status"] == "complete"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(row["rejected"] for row in rows) >= 1
    refusals = [r.getMessage() for r in caplog.records if "rejected the update of partition" in r.getMessage()]
    assert refusals and all(REASONS[attack] in message for message in refusals), refusals
    final = torch.load(run_dir / "final_model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())


def test_a_strategy_cannot_override_the_screened_aggregation():
    with pytest.raises(TypeError, match="aggregate_updates"):
        class Sneaky(FederatedStrategy):  # noqa: F841
            def aggregate_train(self, server_round, replies):
                return None, None


def test_hostile_clients_are_drawn_once_and_exactly():
    spec = FaultSpec(hostile=0.1, seed=3)
    hostile = [p for p in range(50) if spec.is_hostile(p, 50)]
    assert len(hostile) == 5 and hostile == [p for p in range(50) if FaultSpec(hostile=0.1, seed=3).is_hostile(p, 50)]


def test_robust_bounds_are_checked_when_the_run_is_configured(tmp_path):
    from tests.helpers import run_cli

    result = run_cli(["robust.max_norm_ratio=0.5", f"hydra.run.dir={tmp_path}/run"])
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: robust.max_norm_ratio:")
    assert not (tmp_path / "run").exists()


MNIST = [f"data.root={ROOT.parent / 'shared' / 'data'}", "data=mnist", "num_clients=20", "fraction_fit=0.5",
         "rounds=5", "train.epochs=2"]


@pytest.mark.slow
def test_one_hostile_client_in_ten_every_round_costs_under_two_points():
    """Real digits, 20 clients (2 hostile), 10 per round, 5 rounds: the clean run, then 3e38 weights,
    then num-examples 1e30, from the same seed."""
    import tempfile
    from pathlib import Path

    finals = {}
    for kind in ("clean", "huge", "inflate"):
        extra = [] if kind == "clean" else ["faults.hostile=0.1", f"faults.hostile_kind={kind}"]
        with tempfile.TemporaryDirectory() as tmp:
            summary, run_dir = run_inprocess(Path(tmp) / "run", [*MNIST, *extra])
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert summary["status"] == "complete"
        assert (sum(r["rejected"] for r in rows) > 0) == (kind != "clean")
        finals[kind] = summary["final_accuracy"]
    assert finals["clean"] > 0.5, finals  # the clean run learns
    assert abs(finals["huge"] - finals["clean"]) <= 0.02 and abs(finals["inflate"] - finals["clean"]) <= 0.02, finals


@pytest.mark.parametrize("strategy", sorted(STRATEGIES) + ["fedavg_vectorized"])
def test_screening_on_the_worker_threads_decides_as_the_server_would(strategy, tmp_path, monkeypatch, delta_cache):
    """The in-process engine hands each reply to ``prescreen`` on the worker thread that produced
    it; the run's refusals and final model are those of a run whose server screens every reply
    itself after the round."""
    import threading

    overrides = [*STRATEGIES.get(strategy, ["engine.batch_clients=3"]), "faults.hostile=0.5",
                 "faults.hostile_kind=misshapen", "rounds=2"]
    if strategy == "delta":
        overrides.append(f"model.cache_dir={delta_cache}")
    threads: list[str] = []
    screen_one = FederatedStrategy.screen_one

    def recorded(self, server_round, reply):
        threads.append(threading.current_thread().name)
        return screen_one(self, server_round, reply)

    monkeypatch.setattr(FederatedStrategy, "screen_one", recorded)
    runs = {}
    for mode in ("on workers", "after the round"):
        if mode == "after the round":
            monkeypatch.setattr(FederatedStrategy, "prescreen", None)
        threads.clear()
        summary, run_dir = run_inprocess(tmp_path / mode.replace(" ", "_"), overrides)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = (summary["status"], [row["rejected"] for row in rows],
                      torch.load(run_dir / "final_model.pt", weights_only=True), list(threads))
    on_workers, after = runs["on workers"], runs["after the round"]
    assert on_workers[0] == after[0] == "complete" and on_workers[1] == after[1] and sum(after[1]) >= 1
    assert all(name.startswith("client") for name in on_workers[3]) and on_workers[3]
    assert not any(name.startswith("client") for name in after[3])
    assert on_workers[2].keys() == after[2].keys()
    assert all(torch.equal(on_workers[2][k], after[2][k]) for k in after[2])
