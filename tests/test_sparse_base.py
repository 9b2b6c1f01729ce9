"""The sparse pretraining of the pair's base (fl/delta/sparse_base.py), the FedDST arm's start, by
observation: exactly FedDST's ERK budget of nonzero weights, pruned weights held at zero through
the retraining, FedDST's first mask keeps exactly those weights, cached, and bad options refused."""

from __future__ import annotations

import pytest
import torch

from fl.delta.models import pretrained
from fl.delta.sparse_base import SparseSpec, ensure_sparse_base
from fl.errors import ConfigError
from fl.sparsity import erk_budgets, prunable_shapes
from strategies.feddst import FedDST
from tests.test_delta_network import TINY_DATA, tiny_pair_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = SparseSpec.from_options({"sparsity": 0.8, "finetune": {"epochs": 2, "lr": 0.01}})


def test_the_sparse_base_holds_feddsts_budget_and_its_first_mask_keeps_it(tmp_path):
    base = ensure_sparse_base(tiny_pair_spec(), SPEC, str(tmp_path))
    state = base.state_dict()
    budgets = erk_budgets(prunable_shapes(state), 0.8)
    for name, k in budgets.items():
        assert int((state[name] != 0).sum()) <= k, name
    assert sum(int((state[n] != 0).sum()) for n in budgets) >= 0.99 * sum(budgets.values())
    strategy = FedDST(sparsity=0.8, num_rounds=4)
    strategy.initialize(state)
    for name, mask in strategy.mask.items():  # the federation starts from this model as it is
        assert int(mask.sum()) == budgets[name] and torch.all(state[name][~mask] == 0), name
    report = next(tmp_path.glob("pair-*/sparse-*/report.json"))
    again = ensure_sparse_base(tiny_pair_spec(), SPEC, str(tmp_path))  # from the cache
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    assert report.exists()


def test_the_kept_weights_are_retrained_not_only_pruned(tmp_path):
    sparse = ensure_sparse_base(tiny_pair_spec(), SPEC, str(tmp_path))  # builds the pair too
    pair_base = torch.load(next(tmp_path.glob("pair-*/base.pt")), weights_only=True)
    state = sparse.state_dict()
    kept_and_moved = sum(int(((state[n] != 0) & (state[n] != pair_base[n])).sum()) for n in prunable_shapes(state))
    assert kept_and_moved > 0


def test_the_zoo_entry_builds_it_and_refuses_bad_options(tmp_path):
    pair = {"data": TINY_DATA, "seed": 0, "server_samples": 48, "base": {"name": "vgg8", "width": 0.125},
            "edge": {"name": "cnn_small", "width": 0.25, "hidden": 16}, "base_recipe": {"epochs": 1, "lr": 0.05},
            "edge_recipe": {"epochs": 1, "lr": 0.02}}
    model = pretrained(num_classes=10, pair=pair, sparse={"sparsity": 0.8, "finetune": {"epochs": 1, "lr": 0.01}},
                       cache_dir=str(tmp_path))
    weights = [p for n, p in model.named_parameters() if p.dim() >= 2]
    zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert zeros >= 0.79
    with pytest.raises(ConfigError, match="model.sparse.sparsity"):
        SparseSpec.from_options({"sparsity": 1.5})
    with pytest.raises(ConfigError, match="model.sparse.bogus"):
        SparseSpec.from_options({"sparsity": 0.5, "bogus": 1})
    with pytest.raises(ConfigError, match="model.sparse"):
        pretrained(num_classes=10, role="edge", pair=pair, sparse={"sparsity": 0.5}, cache_dir=str(tmp_path))
