"""train.bn_stats: the BatchNorm statistics a client uploads (fl/batchnorm.py)."""

import numpy as np
import pytest
import torch
from torch import nn

from fl.batchnorm import recompute_batchnorm
from fl.errors import ConfigError
from fl.local_training import ClientData, TrainHyper, train_dense


class _Images:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def get(self, idx):
        return self.x[idx], self.y[idx]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def test_recompute_gives_the_exact_statistics_of_the_final_weights():
    net = _net().train()
    x = torch.randn(40, 3, 8, 8) * 3 + 1
    batches = [(x[:16], None), (x[16:32], None), (x[32:], None)]
    assert len(recompute_batchnorm(net, batches)) == 1
    with torch.no_grad():
        h = net[0](x)
    per_batch = [h[s].transpose(0, 1).flatten(1) for s in (slice(0, 16), slice(16, 32), slice(32, 40))]
    bn = net[1]
    # cumulative average over the batches of each batch's mean and unbiased variance
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(1) for b in per_batch]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(1) for b in per_batch]).mean(0))
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3


def test_layers_the_pass_does_not_reach_or_that_are_frozen_keep_their_statistics():
    model = nn.Module()
    model.net, model.frozen, model.unused = _net().train(), nn.BatchNorm2d(4).eval(), nn.BatchNorm2d(4).train()
    for bn in (model.frozen, model.unused):
        bn.running_mean.fill_(7.0)
    x = torch.randn(8, 3, 8, 8)
    assert recompute_batchnorm(model, [(x, None)], forward=lambda t: model.frozen(model.net[0](t))) == []
    assert recompute_batchnorm(model, [(x, None)], forward=model.net) == [model.net[1]]
    assert float(model.frozen.running_mean[0]) == 7.0 and float(model.unused.running_mean[0]) == 7.0
    assert float(model.net[1].running_mean.abs().max()) < 7.0


@pytest.mark.parametrize("bn_stats", ["global", "local", "ema"])
def test_train_dense_uploads_the_statistics_it_was_asked_for(bn_stats):
    x, y = torch.randn(48, 3, 8, 8) * 2 + 3, torch.randint(0, 3, (48,))
    data = ClientData(_Images(x, y), np.arange(48))
    net = _net()
    with torch.no_grad():
        received = net[0](x).mean((0, 2, 3))  # the first conv's output mean under the received weights
    train_dense(net, data, TrainHyper(epochs=1, batch_size=16, lr=0.1, bn_stats=bn_stats), torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = net[0](x).mean((0, 2, 3))
    assert (final - received).abs().max() > 1e-3  # training moved the conv
    mean = net[1].running_mean
    if bn_stats == "global":
        torch.testing.assert_close(mean, received)
    elif bn_stats == "local":
        torch.testing.assert_close(mean, final)
    else:  # three EMA steps from zero keep 0.9^3 of the initial 0
        assert (mean - final).abs().max() > 0.5 and (mean - received).abs().max() > 0.5


def test_an_unknown_choice_is_a_config_error(tmp_path):
    from fl.config import build
    from tests.helpers import SMALL, SMALL_SYNTHETIC, compose_config

    with pytest.raises(ConfigError, match="train.bn_stats"):
        build(compose_config(SMALL + SMALL_SYNTHETIC + ["train.bn_stats=sometimes"]), str(tmp_path))


def test_a_last_batch_of_one_sample_joins_the_one_before_for_batchnorm_models():
    from fl.batchnorm import smallest_batch

    x, y = torch.randn(33, 3, 8, 8), torch.arange(33)
    data = ClientData(_Images(x, y), np.arange(33))
    assert smallest_batch(_net()) == 2 and smallest_batch(nn.Linear(3, 3)) == 1
    assert [len(b[1]) for b in data.batches(16, None, min_size=2)] == [16, 17]
    assert [len(b[1]) for b in data.batches(16, None)] == [16, 16, 1]
    assert [len(b[1]) for b in data.batches(64, None, min_size=2)] == [33]  # one batch stays as it is
    seen = torch.cat([b[1] for b in data.batches(16, torch.Generator().manual_seed(0), min_size=2)])
    assert sorted(seen.tolist()) == list(range(33))


def test_a_model_without_batchnorm_costs_no_extra_pass():
    calls = []
    net = nn.Linear(4, 2)
    assert recompute_batchnorm(net, [(torch.randn(3, 4), None)], forward=lambda t: calls.append(t)) == []
    assert calls == []
