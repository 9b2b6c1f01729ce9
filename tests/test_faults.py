"""No bad update is ever aggregated; faulty clients are counted and the round goes on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl.faults import FaultSpec
from fl.message_keys import ARRAYS, METRICS, NUM_EXAMPLES
from fl.run_logger import read_metrics
from strategies import FedAvg
from tests.helpers import run_inprocess

REFERENCE = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "n": torch.tensor(0)}


def _reply(node: int, arrays: ArrayRecord, n: int = 10) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), node, "train")
    instruction.metadata.__dict__["_message_id"] = f"m{node}"
    reply = Message(RecordDict({ARRAYS: arrays, METRICS: MetricRecord({NUM_EXAMPLES: n})}), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def _good(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((4, 3), value), "b": torch.full((3,), value), "n": torch.tensor(1)})


def _bad_cases() -> dict[str, ArrayRecord]:
    good = _good(1.0)
    nan = {k: a.numpy().copy() for k, a in good.items()}
    nan["w"][0, 0] = np.nan
    inf = {k: a.numpy().copy() for k, a in good.items()}
    inf["b"][1] = np.inf
    truncated = ArrayRecord({k: a for k, a in good.items()})
    array = truncated["w"]
    truncated["w"] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-8])
    return {
        "nan": ArrayRecord({k: Array(v) for k, v in nan.items()}),
        "inf": ArrayRecord({k: Array(v) for k, v in inf.items()}),
        "shape": ArrayRecord({"w": torch.ones(3, 4), "b": torch.ones(3), "n": torch.tensor(1)}),
        "dtype": ArrayRecord({"w": torch.ones(4, 3, dtype=torch.float64), "b": torch.ones(3), "n": torch.tensor(1)}),
        "truncated": truncated,
        "oversized": ArrayRecord({"w": torch.ones(4, 3), "b": torch.ones(3), "n": torch.tensor(1),
                                  "extra": torch.ones(100_000)}),
        "missing": ArrayRecord({"w": torch.ones(4, 3), "n": torch.tensor(1)}),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_update_rejected_and_never_aggregated(case):
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    strategy.reference = REFERENCE
    replies = [_reply(1, _good(1.0)), _reply(2, _bad_cases()[case]), _reply(3, _good(3.0))]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = arrays.to_torch_state_dict()
    assert torch.equal(out["w"], torch.full((4, 3), 2.0))  # the mean of the two good updates only
    assert len(strategy.rejections[1]) == 1 and strategy.rejections[1][0].startswith("partition 2:")


def test_too_few_sound_updates_keep_the_model():
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=1)
    strategy.reference = REFERENCE
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, _good(1.0)), _reply(2, _bad_cases()["nan"])])
    assert arrays is None and metrics is None


def test_fault_draws_are_seeded_and_independent_of_order():
    spec = FaultSpec(crash=0.2, nan=0.1, seed=3)
    draws = {(r, p): spec.draw(r, p) for r in range(1, 4) for p in range(50)}
    assert draws == {(r, p): spec.draw(r, p) for r in range(3, 0, -1) for p in reversed(range(50))}
    crash_rate = np.mean([d["crash"] for d in draws.values()])
    assert 0.1 < crash_rate < 0.3


def test_crashes_and_nans_counted_never_aggregated(tmp_path):
    summary, run_dir = run_inprocess(tmp_path, ["num_clients=20", "fraction_fit=0.5", "rounds=3",
                                                "faults.crash=0.2", "faults.nan=0.2"])
    rows = read_metrics(run_dir)[1:]
    spec = FaultSpec(crash=0.2, nan=0.2, seed=0)
    assert summary["status"] == "complete"
    assert sum(r["failures"] for r in rows) > 0 and sum(r["rejected"] for r in rows) > 0
    for row in rows:
        assert row["clients"] + row["failures"] == 10
        assert row["accuracy"] is not None and np.isfinite(row["loss"])
    state = torch.load(run_dir / "final_model.pt")
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    expected_crashes = [sum(spec.draw(r, p)["crash"] for p in _sampled(0, r, 20, 10)) for r in (1, 2, 3)]
    assert [r["failures"] for r in rows] == expected_crashes


def _sampled(seed, server_round, n, k):
    from fl.sampling import sample_partitions

    return sample_partitions(seed, server_round, "train", list(range(n)), k)


def test_hanging_client_past_timeout_is_dropped(tmp_path):
    summary, run_dir = run_inprocess(tmp_path, ["num_clients=6", "fraction_fit=1.0", "rounds=1", "faults.hang=0.3",
                                                "faults.hang_seconds=3", "round_timeout=1.5", "engine.workers=6"])
    row = read_metrics(run_dir)[1]
    hung = sum(FaultSpec(hang=0.3, seed=0).draw(1, p)["hang"] for p in range(6))
    assert hung > 0
    assert row["failures"] == hung and row["clients"] == 6 - hung
