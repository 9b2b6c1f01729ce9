"""fl.local_training.RunningMetrics: the trainers' loss and accuracy, summed on the device, equal the
host loop they replace (``loss.item() * len(y)`` and ``int(hits)`` per batch) bit for bit."""

from __future__ import annotations

import pytest
import torch

from fl.local_training import RunningMetrics


def _host_loop(batches, mean: bool) -> tuple[float, float]:
    loss_sum, correct, seen = 0.0, 0, 0
    for loss, logits, y in batches:
        loss_sum += loss.item() * (len(y) if mean else 1)
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(y)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@pytest.mark.parametrize("mean", [True, False])
def test_one_client_equals_the_host_loop_bit_for_bit(mean):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand((), generator=g) * 3, torch.randn(n, 10, generator=g),
                torch.randint(0, 10, (n,), generator=g)) for n in (32, 32, 17, 32, 5)]
    running = RunningMetrics()
    for loss, logits, y in batches:
        running.add(loss, logits, y, mean=mean)
    (got,) = running.means("loss", "accuracy")
    assert (got["loss"], got["accuracy"]) == _host_loop(batches, mean)  # exact, not approximate


def test_k_clients_at_once_equal_each_clients_host_loop():
    g = torch.Generator().manual_seed(1)
    k, sizes = 4, (16, 16, 9)
    stacked = [(torch.rand(k, generator=g), torch.randn(k, n, 10, generator=g),
                torch.randint(0, 10, (k, n), generator=g)) for n in sizes]
    running = RunningMetrics(k)
    for loss, logits, y in stacked:
        running.add(loss, logits, y)
    for i, got in enumerate(running.means()):
        one = [(loss[i], logits[i], y[i]) for loss, logits, y in stacked]
        assert (got["train_loss"], got["train_accuracy"]) == _host_loop(one, True)


def test_no_batch_gives_zeros_for_every_client():
    assert RunningMetrics(3).means() == [{"train_loss": 0.0, "train_accuracy": 0.0}] * 3
