"""Scale: memory does not grow with registered clients, and nothing about the data changes.

The federation of a large num_clients is built with a few bytes per sample (compact labels, one
flat partition), the synthetic set's pixel cache stays bounded whatever is read, and every client's
bytes, labels and partition are those of the old, all-resident path (``bench/scale.py`` measures
whole runs of 10k to 1M clients).
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.data import (
    PARTITIONERS,
    SyntheticImageSet,
    build_federation,
    clear_federation_cache,
    label_histogram,
    synthetic,
)
from fl.data.partition import ClientIndices
from fl.engine.inprocess import ConsecutiveIds, InProcessGrid
from fl.engine.metered import MeteredGrid
from fl.node_directory import NodeDirectory
from fl.sampling import sample_partitions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_federation_cache()
    yield
    clear_federation_cache()


def _old_iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The iid partitioner as it was: a list of per-client arrays."""
    perm = rng.permutation(len(labels))
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_clients)]


@pytest.mark.parametrize("n,num_clients", [(1000, 7), (1000, 1000), (997, 10), (5, 1), (50_000, 1000)])
def test_iid_partition_is_the_old_one(n, num_clients):
    labels = np.zeros(n, dtype=np.int64)
    new = PARTITIONERS.get("iid")(labels, num_clients, np.random.default_rng([3, 0x9A27]))
    old = _old_iid(labels, num_clients, np.random.default_rng([3, 0x9A27]))
    assert isinstance(new, ClientIndices) and len(new) == len(old)
    for a, b in zip(new, old):
        assert a.dtype == np.int64
        np.testing.assert_array_equal(a, b)


def test_client_indices_pack_and_histogram_agree_with_lists():
    labels = np.random.default_rng(0).integers(10, size=3000)
    parts = PARTITIONERS.get("dirichlet")(labels, 40, np.random.default_rng(1), beta=0.3)
    packed = ClientIndices.pack(parts)
    assert packed.flat.dtype == np.int32 and len(packed) == 40
    assert all(np.array_equal(a, b) for a, b in zip(packed, parts))
    np.testing.assert_array_equal(packed.sizes(), [len(p) for p in parts])
    np.testing.assert_array_equal(label_histogram(labels, packed, 10, chunk=7), label_histogram(labels, parts, 10))
    np.testing.assert_array_equal(label_histogram(labels.astype(np.uint8), packed, 4), label_histogram(labels, parts, 4))


def test_large_set_labels_are_compact_and_the_same_stream():
    size = synthetic.INT64_LABELS + 12_345
    big = SyntheticImageSet(size, seed=4)
    assert big.labels.dtype == np.uint8 and big.labels.nbytes == size
    reference = np.random.default_rng([4, 0, synthetic._LABEL_TAG]).integers(10, size=size)
    np.testing.assert_array_equal(big.labels, reference)
    _, y = big.get(np.array([0, size - 1]))
    assert y.dtype == torch.int64 and y.tolist() == reference[[0, size - 1]].tolist()


def test_ring_cache_bytes_equal_the_all_resident_path_in_any_order(monkeypatch):
    monkeypatch.setattr(synthetic, "DIRECT_CACHE", 100)
    monkeypatch.setattr(synthetic, "RING_CACHE", 32)
    lazy = SyntheticImageSet(400, seed=9)
    assert lazy._ring is not None and lazy._ring.pixels.shape[0] == 32
    monkeypatch.setattr(synthetic, "DIRECT_CACHE", 1 << 16)
    resident = SyntheticImageSet(400, seed=9)
    assert resident._ring is None
    reference = resident.pixels(np.arange(400))
    rng = np.random.default_rng(0)
    for size in (1, 16, 50, 33, 100, 16):  # hits, misses, repeats and batches larger than the ring
        idx = rng.integers(0, 400, size=size)
        assert torch.equal(lazy.pixels(idx), reference[idx])
        x, y = lazy.get(idx)
        x_ref, y_ref = resident.get(idx)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert len(lazy._ring.slot_of) == 32  # bounded, whatever was read
    assert torch.equal(lazy.pixels(np.arange(399, -1, -1)), reference.flip(0))


def test_federation_of_many_clients_allocates_a_few_bytes_per_sample():
    """200,000 clients (10M samples): the old path allocated 30 GB of pixel address space, 80 MB of
    labels and an array per client; this one allocates, at its peak, about 6 bytes per sample (a
    label, a partition index, a check byte), the histogram and the fixed ring of rendered images."""
    num_clients, per_client = 200_000, 50
    tracemalloc.start()
    try:
        fed = build_federation("synthetic", num_clients, 0, None, samples_per_client=per_client, test_size=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    samples = num_clients * per_client
    ring = fed.train._ring.pixels.nbytes
    assert ring == synthetic.RING_CACHE * 3 * 32 * 32
    assert peak < 6 * samples + fed.histogram.nbytes + ring + (24 << 20), f"peak {peak / 2**20:.0f} MiB"
    assert fed.num_clients == num_clients and fed.client_indices.flat.dtype == np.int32
    x, y = fed.train.get(fed.client_indices[123_456])
    assert x.shape == (per_client, 3, 32, 32) and y.dtype == torch.int64


def test_a_clients_bytes_are_those_of_the_all_resident_path(monkeypatch):
    """Every client of a federation too large for the all-resident cache reads, in any order, the
    bytes and labels that the all-resident path (the old one) gives for the same indices."""
    num_clients = 1400  # 70,000 samples: above DIRECT_CACHE
    fed = build_federation("synthetic", num_clients, 5, None, samples_per_client=50, test_size=10)
    monkeypatch.setattr(synthetic, "DIRECT_CACHE", 1 << 17)
    resident = SyntheticImageSet(len(fed.train), seed=5, name="synthetic/train")
    assert fed.train._ring is not None and resident._ring is None
    np.testing.assert_array_equal(fed.train.labels, resident.labels)
    for cid in (1399, 3, 700, 3):
        idx = fed.client_indices[cid]
        order = np.random.default_rng(cid).permutation(len(idx))
        assert torch.equal(fed.train.pixels(idx[order]), resident.pixels(idx[order]))
        x, y = fed.train.get(idx)
        x_ref, y_ref = resident.get(idx)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_inprocess_grid_holds_nothing_per_registered_node():
    grid = MeteredGrid(InProcessGrid(lambda message, context: None, 1_000_000, workers=1))
    try:
        assert grid.get_node_ids() == range(1, 1_000_001)
        directory = NodeDirectory.discover(grid)
        assert len(directory) == 1_000_000 and isinstance(directory.node_of_partition, ConsecutiveIds)
        assert directory.node_of_partition[999_999] == 1_000_000 and directory.partition_of_node[1] == 0
        assert directory.partition_of_node.get(0, -7) == -7 and 1_000_000 not in directory.node_of_partition
        assert grid.node_states() == {}
        picked = sample_partitions(0, 1, "train", list(directory.node_of_partition), 100)
        assert picked == sample_partitions(0, 1, "train", list(range(1_000_000)), 100)
    finally:
        grid.inner.close()


def test_consecutive_ids_behave_as_the_dict():
    ids = ConsecutiveIds(5, shift=1)
    assert ids == {0: 1, 1: 2, 2: 3, 3: 4, 4: 5} and ids.inverse() == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    assert ids[np.int64(2)] == 3 and "2" not in ids and True not in ids and set(ids.values()) == {1, 2, 3, 4, 5}
    with pytest.raises(KeyError):
        ids[5]


def test_absurd_num_clients_is_refused_before_allocating():
    code = ("from fl.data import build_federation\n"
            "try:\n    build_federation('synthetic', 10**9, 0, None)\n"
            "except MemoryError as exc:\n    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.startswith("refused: synthetic/train: 50,000,000,000 samples"), out
