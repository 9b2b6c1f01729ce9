"""A virtual clock for heterogeneous devices: how long a synchronous round would take.

Each partition is assigned a device profile (seeded, in the configured shares). For a client in a
round:
    compute_s = 3 * forward_MACs_per_sample * samples * epochs / macs_per_s   (train messages;
                forward + backward ~ 3x the forward MACs; evaluate messages count 1x)
    comm_s    = down_bytes / down_bytes_per_s + up_bytes / up_bytes_per_s    (the counted bytes)
and the round lasts as long as its slowest client that is kept. With ``deadline_s`` set, a client
whose time exceeds it is a straggler: its reply is dropped before aggregation and counted, and
the round lasts ``deadline_s``. The profiles shipped in ``sim_configs/device/`` are illustrative
orders of magnitude, not measurements; give your own devices' numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl.errors import ConfigError

_ASSIGN_STREAM = 0xDE71


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    macs_per_s: float
    up_mbit_s: float
    down_mbit_s: float
    share: float = 1.0


@dataclass(frozen=True)
class ClockSpec:
    profiles: tuple[DeviceProfile, ...]
    forward_macs: int  # per sample, of the run's model
    deadline_s: float | None = None
    seed: int = 0

    def assign(self, num_partitions: int) -> list[DeviceProfile]:
        """The profile of every partition: shares rounded to counts, then a seeded shuffle."""
        shares = np.array([p.share for p in self.profiles], dtype=float)
        counts = np.floor(shares / shares.sum() * num_partitions).astype(int)
        counts[: num_partitions - counts.sum()] += 1
        order = np.random.default_rng([self.seed, _ASSIGN_STREAM]).permutation(num_partitions)
        labels = np.repeat(np.arange(len(self.profiles)), counts)
        out: list[DeviceProfile] = [self.profiles[0]] * num_partitions
        for partition, label in zip(order, labels):
            out[partition] = self.profiles[label]
        return out

    def client_seconds(self, profile: DeviceProfile, *, samples: int, epochs: int, train: bool,
                       down_bytes: int, up_bytes: int) -> float:
        macs = (3 if train else 1) * self.forward_macs * samples * epochs
        return (macs / profile.macs_per_s + down_bytes * 8 / (profile.down_mbit_s * 1e6)
                + up_bytes * 8 / (profile.up_mbit_s * 1e6))


def clock_spec(cfg: dict | None, forward_macs: int, seed: int) -> ClockSpec | None:
    if not cfg or not cfg.get("profiles"):
        return None
    profiles = []
    for i, p in enumerate(cfg["profiles"]):
        try:
            profile = DeviceProfile(name=str(p["name"]), macs_per_s=float(p["macs_per_s"]),
                                    up_mbit_s=float(p["up_mbit_s"]), down_mbit_s=float(p["down_mbit_s"]),
                                    share=float(p.get("share", 1.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"device.profiles[{i}]", f"needs name, macs_per_s, up_mbit_s, down_mbit_s "
                                                       f"(and share): {exc}") from None
        if min(profile.macs_per_s, profile.up_mbit_s, profile.down_mbit_s, profile.share) <= 0:
            raise ConfigError(f"device.profiles[{i}]", "speeds, bandwidths and share must be > 0")
        profiles.append(profile)
    deadline = cfg.get("deadline_s")
    if deadline is not None and float(deadline) <= 0:
        raise ConfigError("device.deadline_s", f"must be > 0 or null, got {deadline}")
    return ClockSpec(tuple(profiles), int(forward_macs), None if deadline is None else float(deadline), seed)
