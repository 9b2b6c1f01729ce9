"""Unit tests of the config builder (fl.config.build): what each config key becomes in the typed
specs the run reads. Bad values are tests/test_bad_input.py's; this file checks the good ones land."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fl.config import build
from tests.helpers import SMALL, SMALL_SYNTHETIC, compose_config

BASE = SMALL + SMALL_SYNTHETIC


def _build(tmp_path, *overrides):
    return build(compose_config(BASE + list(overrides)), str(tmp_path))


def test_settings_land_in_the_server_and_engine_specs(tmp_path):
    server, engine, faults = _build(tmp_path, "rounds=3", "seed=5", "eval_every=2", "checkpoint_every=1",
                                    "train.epochs=2", "train.batch_size=8", "train.lr=0.1", "train.momentum=0.5",
                                    "train.weight_decay=0.001", "train.bn_stats=local", "engine.workers=3",
                                    "engine.torch_threads=2", "round_timeout=30", "faults.crash=0.25")
    assert (server.rounds, server.eval_every, server.checkpoint_every, server.round_timeout) == (3, 2, 1, 30.0)
    assert server.run_dir == str(tmp_path) and server.tensorboard is False and server.progress is False
    hyper = server.train
    assert (hyper.epochs, hyper.batch_size, hyper.lr, hyper.momentum, hyper.weight_decay, hyper.bn_stats) == \
        (2, 8, 0.1, 0.5, 0.001, "local")
    assert (engine.name, engine.workers, engine.torch_threads) == ("inprocess", 3, 2)
    assert server.client.seed == 5 and server.client.data.num_clients == 6
    assert faults.crash == 0.25 and faults.seed == 5


def test_the_strategy_factory_builds_a_fresh_strategy_with_the_run_settings(tmp_path):
    server, _, _ = _build(tmp_path, "seed=3", "codec.up=fp16", "robust.max_norm_ratio=10", "fraction_fit=0.5",
                          "min_fit_clients=2")
    first, second = server.make_strategy(), server.make_strategy()
    assert first is not second  # a resumed or repeated run never shares a strategy's state
    assert first.seed == 3 and first.up_codec.name == "fp16" and first.down_codec.name == "dense_fp32"
    assert first.robust.max_norm_ratio == 10 and first.robust.max_weight_ratio == 100
    assert (first.fraction_train, first.min_train_nodes, first.min_available_nodes) == (0.5, 2, 6)


@pytest.mark.parametrize("strategy, up", [("fedavg", "fp16"), ("feddst", "bitmap_fp16"), ("hermes", "channel_slice_fp16")])
def test_codec_up_is_resolved_in_the_strategys_payload_family(tmp_path, strategy, up):
    server, _, _ = _build(tmp_path, f"strategy={strategy}", "codec.up=fp16")
    assert server.make_strategy().up_codec.name == up


def test_a_plain_flower_strategy_gets_flowers_arguments_only(tmp_path):
    server, _, _ = _build(tmp_path, "strategy._target_=flwr.serverapp.strategy.FedAvg")
    strategy = server.make_strategy()
    assert type(strategy) is FlowerFedAvg and strategy.fraction_train == 0.5


def test_plugins_are_specs_built_once_at_config_time(tmp_path):
    server, _, _ = _build(tmp_path, "plugins=[update_norms]")
    assert [p.name for p in server.client.plugins] == ["update_norms"]
    assert server.client.plugins[0].build().name == "update_norms"
