"""Federation building: partition wiring, histogram and its log line, validation, the memo."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from fl.data import (
    DATASETS,
    Federation,
    ImageSet,
    build_federation,
    clear_federation_cache,
    client_split,
    get_federation,
)
from fl.errors import ConfigError


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_federation_cache()
    yield
    clear_federation_cache()


def test_synthetic_federation_shape_and_partition(caplog):
    with caplog.at_level(logging.INFO, logger="fl.data"):
        fed = build_federation("synthetic", 20, 0, {"name": "shards", "classes_per_client": 2},
                               samples_per_client=30, test_size=100)
    assert isinstance(fed, Federation) and fed.name == "synthetic" and fed.num_clients == 20
    assert (len(fed.train), len(fed.test)) == (600, 100)
    assert (fed.num_classes, fed.channels, fed.image_size) == (10, 3, 32)
    flat = np.concatenate(fed.client_indices)
    np.testing.assert_array_equal(np.sort(flat), np.arange(600))
    assert fed.histogram.shape == (20, 10)
    np.testing.assert_array_equal(fed.histogram.sum(axis=1), [len(p) for p in fed.client_indices])
    assert (fed.histogram > 0).sum(axis=1).max() <= 2
    lines = [r.getMessage() for r in caplog.records if r.name == "fl.data"]
    assert len(lines) == 1 and "20 clients" in lines[0] and "classes/client" in lines[0]


def test_same_arguments_same_federation_and_seed_matters():
    a = build_federation("synthetic", 10, 1, {"name": "dirichlet", "beta": 0.3}, samples_per_client=20)
    b = build_federation("synthetic", 10, 1, {"name": "dirichlet", "beta": 0.3}, samples_per_client=20)
    c = build_federation("synthetic", 10, 2, {"name": "dirichlet", "beta": 0.3}, samples_per_client=20)
    assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    assert not np.array_equal(a.train.labels, c.train.labels)


def test_partition_defaults_to_iid():
    fed = build_federation("synthetic", 5, 0, None, samples_per_client=10)
    assert sorted(len(p) for p in fed.client_indices) == [10] * 5
    assert build_federation("synthetic", 5, 0, "iid", samples_per_client=10).num_clients == 5


@pytest.mark.parametrize("num_clients", [0, -3, 2.5, True])
def test_bad_num_clients(num_clients):
    with pytest.raises(ConfigError) as info:
        build_federation("synthetic", num_clients, 0, {"name": "iid"})
    assert info.value.key == "num_clients"


def test_more_clients_than_samples(monkeypatch):
    tiny = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), np.arange(4) % 2, 2, (0.5,), (0.5,))
    monkeypatch.setitem(DATASETS._entries, "tiny", lambda *, num_clients, seed, root: (tiny, tiny))
    with pytest.raises(ConfigError, match="only 4 training images") as info:
        build_federation("tiny", 5, 0, {"name": "iid"})
    assert info.value.key == "num_clients"


def test_unknown_names_and_options_name_their_key():
    cases = [
        (dict(name="nope"), "data.name"),
        (dict(partition={"name": "nope"}), "data.partition.name"),
        (dict(partition={"name": "iid", "beta": 0.1}), "data.partition.beta"),
        (dict(colour="red"), "data.colour"),
        (dict(partition={"name": "dirichlet", "beta": -1}), "data.partition.beta"),
    ]
    for override, key in cases:
        kwargs = dict(name="synthetic", num_clients=4, seed=0, partition={"name": "iid"})
        kwargs.update(override)
        with pytest.raises(ConfigError) as info:
            build_federation(**kwargs)
        assert info.value.key == key


def test_client_split_is_deterministic_and_disjoint():
    fed = build_federation("synthetic", 8, 0, {"name": "iid"}, samples_per_client=25)
    tr, va = client_split(fed, 3, 0.2, seed=7)
    tr2, va2 = client_split(fed, 3, 0.2, seed=7)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
    assert len(va) == 5 and len(tr) == 20
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), fed.client_indices[3])
    assert not np.array_equal(client_split(fed, 3, 0.2, seed=8)[1], va)
    tr0, va0 = client_split(fed, 3, 0.0, seed=7)
    assert len(va0) == 0 and len(tr0) == 25
    tiny = build_federation("synthetic", 2, 0, {"name": "iid"}, samples_per_client=2)
    assert [len(a) for a in client_split(tiny, 0, 0.1, seed=0)] == [1, 1]
    with pytest.raises(ConfigError):
        client_split(fed, 0, 1.0, seed=0)


def test_get_federation_shares_one_copy_across_threads():
    results = []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        results.append(get_federation("synthetic", 6, 0, {"name": "shards"}, samples_per_client=10))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert get_federation(name="synthetic", num_clients=6, seed=0, partition={"name": "shards"},
                          samples_per_client=10) is results[0]
    assert get_federation("synthetic", 6, 1, {"name": "shards"}, samples_per_client=10) is not results[0]
