"""Partitioner invariants: every sample exactly once, class limits, skew ordering, histograms."""

from __future__ import annotations

import numpy as np
import pytest

from fl.data import PARTITIONERS, label_histogram, stratified_split
from fl.errors import ConfigError


def _labels(n: int = 3000, num_classes: int = 10, seed: int = 0, skewed: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if skewed:  # class c is about (c + 1) times as common as class 0
        p = np.arange(1, num_classes + 1) / np.arange(1, num_classes + 1).sum()
        return rng.choice(num_classes, size=n, p=p).astype(np.int64)
    return rng.integers(num_classes, size=n).astype(np.int64)


def _check_exact_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1 and len(p) > 0
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
    flat = np.concatenate(parts)
    assert len(flat) == n
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))


@pytest.mark.parametrize("name", PARTITIONERS.names())
@pytest.mark.parametrize("num_clients", [1, 7, 100])
@pytest.mark.parametrize("skewed", [False, True])
def test_every_sample_exactly_once(name, num_clients, skewed):
    labels = _labels(skewed=skewed)
    if name == "shards" and num_clients * 3 < 10:  # fewer shards than classes: cannot cover every sample
        with pytest.raises(ConfigError, match="classes_per_client"):
            PARTITIONERS.get(name)(labels, num_clients, np.random.default_rng(1))
        return
    parts = PARTITIONERS.get(name)(labels, num_clients, np.random.default_rng(1))
    _check_exact_cover(parts, len(labels), num_clients)


@pytest.mark.parametrize("name", PARTITIONERS.names())
def test_same_generator_seed_same_partition(name):
    labels = _labels()
    a = PARTITIONERS.get(name)(labels, 20, np.random.default_rng(5))
    b = PARTITIONERS.get(name)(labels, 20, np.random.default_rng(5))
    c = PARTITIONERS.get(name)(labels, 20, np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("num_clients", [10, 30, 100])
@pytest.mark.parametrize("skewed", [False, True])
def test_shards_hold_at_most_k_classes(k, num_clients, skewed):
    labels = _labels(skewed=skewed)
    parts = PARTITIONERS.get("shards")(labels, num_clients, np.random.default_rng(2), classes_per_client=k)
    _check_exact_cover(parts, len(labels), num_clients)
    classes = (label_histogram(labels, parts, 10) > 0).sum(axis=1)
    assert classes.max() <= k
    if num_clients * k >= 30:  # with enough shards nearly every client gets k distinct classes
        assert classes.mean() >= k - 0.3


def test_shards_reject_impossible_settings():
    labels = _labels(100)
    with pytest.raises(ConfigError, match="classes_per_client"):
        PARTITIONERS.get("shards")(labels, 3, np.random.default_rng(0), classes_per_client=3)  # 9 shards, 10 classes
    with pytest.raises(ConfigError, match="classes_per_client"):
        PARTITIONERS.get("shards")(labels, 50, np.random.default_rng(0), classes_per_client=3)  # 150 shards, 100 samples


def _mean_entropy(hist: np.ndarray) -> float:
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nansum(-p * np.log(p), axis=1).mean())


def test_dirichlet_small_beta_is_more_skewed():
    labels = _labels(5000)
    entropies, classes = [], []
    for beta in (0.05, 0.5, 100.0):
        parts = PARTITIONERS.get("dirichlet")(labels, 50, np.random.default_rng(3), beta=beta)
        hist = label_histogram(labels, parts, 10)
        entropies.append(_mean_entropy(hist))
        classes.append((hist > 0).sum(axis=1).mean())
    assert entropies[0] < entropies[1] < entropies[2]
    assert classes[0] < classes[1] <= classes[2]
    assert entropies[2] > 0.95 * np.log(10)


def test_dirichlet_never_leaves_a_client_empty():
    labels = _labels(1000)
    for seed in range(5):
        parts = PARTITIONERS.get("dirichlet")(labels, 200, np.random.default_rng(seed), beta=0.01, max_tries=2)
        _check_exact_cover(parts, 1000, 200)
        assert min(len(p) for p in parts) >= 2
    with pytest.raises(ConfigError, match="beta"):
        PARTITIONERS.get("dirichlet")(labels, 5, np.random.default_rng(0), beta=0)


def test_iid_is_balanced():
    labels = _labels(10_000)
    parts = PARTITIONERS.get("iid")(labels, 10, np.random.default_rng(4))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    hist = label_histogram(labels, parts, 10)
    expected = np.bincount(labels, minlength=10) / 10
    assert np.abs(hist - expected).max() < 0.2 * expected.max()


def test_histogram_sums():
    labels = _labels(skewed=True)
    parts = PARTITIONERS.get("dirichlet")(labels, 12, np.random.default_rng(0), beta=0.3)
    hist = label_histogram(labels, parts, 10)
    assert hist.shape == (12, 10) and hist.dtype == np.int64
    np.testing.assert_array_equal(hist.sum(axis=1), [len(p) for p in parts])
    np.testing.assert_array_equal(hist.sum(axis=0), np.bincount(labels, minlength=10))


def test_too_many_clients():
    with pytest.raises(ConfigError, match="num_clients"):
        PARTITIONERS.get("iid")(_labels(10), 11, np.random.default_rng(0))


def test_stratified_split():
    labels = _labels(2000, skewed=True)
    kept, held = stratified_split(labels, 0.2, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(2000))
    per_class = np.bincount(labels[held], minlength=10) / np.bincount(labels, minlength=10)
    assert np.abs(per_class - 0.2).max() < 0.02
