"""sim=delta_paper, the XDELTA paper's federated experiment: its values, a class subset of CIFAR-100
read from files in the real format written here, bad subsets, missing files, and the preset run
offline with data=synthetic at a small size (the paper's scale is not run in tests)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.compare.arms import plan_arms
from fl.data import build_federation
from fl.data.torchvision_sets import load_torchvision
from fl.errors import ConfigError
from tests.helpers import compose_config, run_cli, run_inprocess

PAPER_CLASSES = list(range(10))
# The preset shrunk to seconds: 8 clients, 2 rounds, tiny VGG16/VGG8 (width 1/8) and a DELTA built in
# one epoch of each central step (tests/golden.py TINY_DELTA, but keeping the preset's VGG16/VGG8).
TINY_PAPER = ["data=synthetic", "data.samples_per_client=16", "data.test_size=64", "num_clients=8",
              "fraction_fit=0.5", "rounds=2", "model.pair.server_samples=48", "model.pair.base.width=0.125",
              "model.pair.edge.width=0.125", "model.pair.base_recipe.epochs=1", "model.pair.edge_recipe.epochs=1"]
TINY_CONSTRUCTION = ["model.construction.extract.epochs=1", "model.construction.extract.finetune.epochs=0",
                     "model.construction.train.epochs=1", "model.construction.train.views=1",
                     "model.construction.kd=null", "model.construction.extract.budget=1.0",
                     "model.construction.extract.delta_dim=6", "model.construction.extract.resizer_hidden=8"]


def write_cifar100(root: Path, train_per_class: int = 6, test_per_class: int = 2, seed: int = 0) -> dict:
    """cifar-100-python/{train,test} as torchvision reads them: a pickled dict with ``data`` (uint8
    [N, 3072], channel-major rows), ``fine_labels``, ``coarse_labels``, ``filenames``, ``batch_label``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
        batch = {"filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": f"{split} batch 1 of 1",
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "data": images.reshape(len(labels), 3072)}
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[split] = (images, labels)
    return written


def test_preset_has_the_papers_values():
    for extra in ([], ["data=synthetic"]):
        cfg = compose_config(["sim=delta_paper", *extra])
        pair = cfg.model.pair
        assert (pair.base.name, pair.base.width, pair.edge.name, pair.edge.width) == ("vgg16", 1.0, "vgg8", 1.0)
        assert cfg.model.name == "delta_fused" and cfg.strategy._target_ == "strategies.delta.DeltaFactorized"
        assert (cfg.num_clients, cfg.fraction_fit, cfg.rounds) == (100, 0.8, 900)
        assert len(cfg.strategy.tiers) == 4 and cfg.strategy.tier_assignment == "equal"
        assert (cfg.data.partition.name, cfg.data.partition.classes_per_client) == ("shards", 3)
    assert compose_config(["sim=delta_paper"]).data.classes == PAPER_CLASSES
    assert compose_config(["sim=delta_paper"]).data.name == "cifar100"
    assert "classes" not in compose_config(["sim=delta_paper", "data=synthetic"]).data


def test_preset_arms_are_the_papers_comparison_on_the_same_pair():
    arms = plan_arms("delta_paper", None, [])
    assert [a.name for a in arms] == ["delta", "fedavg_edge", "fedavg_base", "hermes_base", "feddst_base"]
    for arm in arms:
        cfg = compose_config(["sim=delta_paper", arm.override])
        assert (cfg.model.pair.base.name, cfg.model.pair.edge.name) == ("vgg16", "vgg8"), arm.name
        assert (cfg.num_clients, cfg.fraction_fit, cfg.rounds, cfg.data.classes) == (100, 0.8, 900, PAPER_CLASSES)
    assert compose_config(["sim=delta_paper", "+arm=hermes_base"]).strategy._target_.endswith(".Hermes")


def test_class_subset_reads_the_real_format_and_remaps_labels(tmp_path):
    written = write_cifar100(tmp_path)
    chosen = [42, 7, 99]
    train, test = load_torchvision("cifar100", seed=0, root=str(tmp_path), download=False, classes=chosen)
    assert (len(train), len(test), train.num_classes, test.num_classes) == (18, 6, 3, 3)
    for split, got in (("train", train), ("test", test)):
        images, labels = written[split]
        keep = np.flatnonzero(np.isin(labels, chosen))  # file order, labels by position in `chosen`
        assert got.labels.tolist() == [chosen.index(c) for c in labels[keep]]
        assert torch.equal(got.pixels(np.arange(len(keep))), torch.from_numpy(images[keep]))


def test_class_subset_from_the_test_file_alone(tmp_path):
    write_cifar100(tmp_path, test_per_class=10)
    (tmp_path / "cifar-100-python" / "train").unlink()
    train, test = load_torchvision("cifar100", seed=0, root=str(tmp_path), classes=PAPER_CLASSES, test_fraction=0.2)
    assert (len(train), len(test), train.num_classes) == (80, 20, 10)
    assert np.bincount(test.labels, minlength=10).tolist() == [2] * 10


def test_paper_data_federation_from_files(tmp_path):
    """data=cifar100_10 as the preset composes it: 10 classes, 3 per client, labels 0..9."""
    write_cifar100(tmp_path, train_per_class=30)
    cfg = compose_config(["sim=delta_paper", f"data.root={tmp_path}"])
    options = {k: v for k, v in cfg.data.items() if k not in ("name", "root", "partition")}
    fed = build_federation("cifar100", 100, 0, partition=dict(cfg.data.partition), root=str(tmp_path), **options)
    assert (fed.num_classes, len(fed.train), len(fed.test)) == (10, 300, 20)
    assert set(np.unique(fed.train.labels)) == set(range(10))
    assert ((fed.histogram > 0).sum(axis=1) <= 3).all()


@pytest.mark.parametrize("classes, says", [("[0,100]", "class index 100 is out of range"),
                                           ("[-1,3]", "class index -1 is out of range"),
                                           ("[3,5,3]", "names class 3 more than once"),
                                           ("[]", "non-empty list")])
def test_bad_class_subset_is_one_error_naming_the_key(tmp_path, classes, says):
    from fl.config import build

    write_cifar100(tmp_path)
    cfg = compose_config(["sim=delta_paper", f"data.root={tmp_path}", f"data.classes={classes}"])
    with pytest.raises(ConfigError) as err:
        build(cfg, str(tmp_path / "run"))
    assert err.value.key == "data.classes" and says in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_missing_cifar_files_say_where_to_put_them(tmp_path):
    result = run_cli(["sim=delta_paper", f"data.root={tmp_path / 'nothing'}", "data.download=false",
                      f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: data.root: cifar100 files not found under ")
    assert "cifar-100-python/ (train, test)" in lines[0]
    assert not (tmp_path / "run").exists()


def test_preset_runs_offline_with_synthetic_data(tmp_path):
    summary, run_dir = run_inprocess(tmp_path / "run", ["sim=delta_paper", *TINY_PAPER, *TINY_CONSTRUCTION,
                                                        f"model.cache_dir={tmp_path / 'cache'}"])
    assert summary["status"] == "complete" and summary["rounds"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["cum_up_bytes"] >= 0 for r in rows)
    assert rows[-1]["cum_up_bytes"] > 0
    saved = (run_dir / "config.yaml").read_text()
    assert "name: vgg16" in saved and "name: vgg8" in saved


@pytest.mark.slow
def test_compare_runs_the_papers_arms_offline(tmp_path):
    """python -m fl.compare --sim delta_paper data=synthetic ...: five arms, the table and charts (about a minute)."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = tmp_path / "cmp"
    command = [sys.executable, "-m", "fl.compare", "--sim", "delta_paper", "--out", str(out), *TINY_PAPER,
               "progress=false", "tensorboard=false", "checkpoint_every=0", f"model.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "compare.md").read_text()
    for arm in ("delta", "fedavg_edge", "fedavg_base", "hermes_base", "feddst_base"):
        assert f"| {arm} |" in table
    assert (out / "compare_up.png").exists() and (out / "compare_total.png").exists()
