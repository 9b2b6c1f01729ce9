"""The virtual clock times clients from their device profile and the counted bytes."""

import pytest

from fl.clock import ClockSpec, DeviceProfile, clock_spec
from fl.errors import ConfigError
from fl.run_logger import read_metrics
from tests.helpers import run_inprocess

SLOW = DeviceProfile("slow", macs_per_s=1e6, up_mbit_s=1.0, down_mbit_s=2.0, share=1)
FAST = DeviceProfile("fast", macs_per_s=1e9, up_mbit_s=100.0, down_mbit_s=100.0, share=3)


def test_client_seconds_by_hand():
    spec = ClockSpec((SLOW,), forward_macs=1000)
    # 3 * 1000 MACs * 10 samples * 2 epochs / 1e6 MAC/s = 0.06 s; 1e6 bytes down at 2 Mbit/s = 4 s;
    # 5e5 bytes up at 1 Mbit/s = 4 s
    assert spec.client_seconds(SLOW, samples=10, epochs=2, train=True, down_bytes=10**6, up_bytes=5 * 10**5) \
        == pytest.approx(0.06 + 4 + 4)


def test_assignment_follows_shares_and_seed():
    spec = ClockSpec((SLOW, FAST), forward_macs=1, seed=1)
    assigned = spec.assign(100)
    assert sum(p is SLOW for p in assigned) == 25
    assert assigned == spec.assign(100)
    assert assigned != ClockSpec((SLOW, FAST), forward_macs=1, seed=2).assign(100)


def test_bad_profile_names_the_key():
    with pytest.raises(ConfigError, match=r"device.profiles\[0\]"):
        clock_spec({"profiles": [{"name": "x", "macs_per_s": 0, "up_mbit_s": 1, "down_mbit_s": 1}]}, 1, 0)


def test_deadline_drops_stragglers_and_times_rounds(tmp_path):
    _, run_dir = run_inprocess(tmp_path / "free", ["device=edge_mix", "num_clients=8", "fraction_fit=1.0", "rounds=1"])
    free = read_metrics(run_dir)[1]
    assert free["stragglers"] == 0 and free["sim_s"] > 0 and free["clients"] == 8
    deadline = free["sim_s"] * 0.5  # the slowest devices cannot make it
    _, run_dir = run_inprocess(tmp_path / "deadline", ["device=edge_mix", "num_clients=8", "fraction_fit=1.0",
                                                       "rounds=1", f"device.deadline_s={deadline}"])
    row = read_metrics(run_dir)[1]
    assert row["stragglers"] > 0 and row["clients"] == 8 - row["stragglers"] and row["failures"] == 0
    assert row["sim_s"] == pytest.approx(deadline)
    assert row["up_bytes"] < free["up_bytes"]
