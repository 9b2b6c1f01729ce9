import pytest

from fl.sampling import sample_partitions, seed_for


def test_same_seed_same_clients_different_rounds_differ():
    a = sample_partitions(3, 5, "train", list(range(100)), 80)
    assert a == sample_partitions(3, 5, "train", list(range(100)), 80)
    assert a != sample_partitions(3, 6, "train", list(range(100)), 80)
    assert a != sample_partitions(4, 5, "train", list(range(100)), 80)
    assert len(set(a)) == 80 and a == sorted(a)


def test_order_of_available_does_not_matter():
    ids = list(range(50))
    assert sample_partitions(0, 1, "train", ids, 10) == sample_partitions(0, 1, "train", ids[::-1], 10)


def test_cannot_oversample():
    with pytest.raises(ValueError, match="cannot sample 11"):
        sample_partitions(0, 1, "train", list(range(10)), 11)


def test_client_seeds_distinct():
    seeds = {seed_for(0, r, p) for r in range(5) for p in range(100)}
    assert len(seeds) == 500
