"""The comparison's scenario gives federated training work to do, and each strategy does it.

``sim=delta_compare`` at a reduced size: the server pretrains the pair on clean public scenes
(``model.pair.server_difficulty=0.0``) while the clients hold the task's harder ones, so every arm
starts well below what the clients' data gives. Each arm must then behave as its paper says: FedAvg
on the base moves up from its start, FedDST-like does not wreck its pretrained sparse start in its
first two rounds and ends above it, Hermes-like moves from its start, and DELTA improves with the
rounds. At this size (20 clients, 8 rounds) the gains are a few points; the full-size figures are in
docs/comparison.md.
"""

from __future__ import annotations

import pytest

from fl.run_logger import read_metrics
from tests.helpers import run_inprocess

pytestmark = pytest.mark.slow

ROUNDS = 8
SCENARIO = [
    "sim=delta_compare", f"rounds={ROUNDS}", "num_clients=20", "fraction_fit=1.0", "data.samples_per_client=50",
    "data.test_size=500",
    # the preset's local training (tests/helpers.SMALL pins other values)
    "train.epochs=1", "train.batch_size=32", "train.lr=0.01", "train.momentum=0.9",
    # a smaller pair, pretrained on 600 clean scenes (the preset: 3,000)
    "model.pair.server_samples=600", "model.pair.base.width=0.25", "model.pair.base_recipe.epochs=8",
    "model.pair.edge_recipe.epochs=8",
]
SMALL_DELTA = ["model.construction.extract.epochs=1", "model.construction.extract.finetune.epochs=1",
               "model.construction.train.epochs=8", "model.construction.train.views=2", "model.construction.kd=null"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("delta-cache")


def _accuracies(tmp_path, cache, arm: str) -> list[float]:
    summary, run_dir = run_inprocess(tmp_path / arm, [*SCENARIO, f"+arm={arm}", f"model.cache_dir={cache}",
                                                      *(SMALL_DELTA if arm == "delta" else [])])
    assert summary["status"] == "complete"
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    return [r["accuracy"] for r in rows]


def test_fedavg_on_the_base_moves_up_from_its_pretrained_start(tmp_path, cache):
    acc = _accuracies(tmp_path, cache, "fedavg_base")
    assert max(acc[1:]) > acc[0] + 0.02, acc


def test_feddst_keeps_its_pretrained_sparse_start_and_then_improves_it(tmp_path, cache):
    acc = _accuracies(tmp_path, cache, "feddst_base")
    assert min(acc[1:3]) > acc[0] - 0.02, acc  # its first two rounds do not destroy the sparse start
    assert acc[-1] > acc[0] + 0.05, acc


def test_hermes_moves_from_its_start(tmp_path, cache):
    acc = _accuracies(tmp_path, cache, "hermes_base")
    assert max(abs(a - acc[0]) for a in acc[1:]) > 0.02, acc


def test_delta_improves_with_the_rounds(tmp_path, cache):
    acc = _accuracies(tmp_path, cache, "delta")
    assert acc[-1] > acc[0] + 0.03 and acc[-1] > acc[ROUNDS // 2], acc
