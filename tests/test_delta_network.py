"""The DELTA network and its central construction (fl/delta), by observation: the fused forward is
the paper's formula on a hand-built example; width tiers are nested prefix blocks; ordering by
importance changes no output; the extraction's masks, pruning, folding and size budget do what
they say; the whole pipeline runs on a tiny pair and reports every figure."""

from __future__ import annotations

import copy
import json
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl.delta.construct import ConstructionSpec, TierBranches, correlation_scores, ensure_delta
from fl.delta.pair import translate
from fl.delta.extract import (CONV_RATES, ExtractSettings, blocks_of, choose_depth, fold_block, kept_count,
                              learn_sparsity, prune_base, rate_masks)
from fl.delta.network import (DeltaArch, FusedDelta, delta_macs, delta_params, fnc_loss, group_lasso,
                              order_by_importance, tier_keep, tier_model, tier_shapes, tier_slice)
from fl.delta.pair import PairSpec
from fl.errors import ConfigError
from fl.models import get_model, model_profile
from fl.payload import keep_coordinates

WIDTHS = (1.0, 1 / math.sqrt(2), 0.5, 1 / (2 * math.sqrt(2)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_arch(**changes) -> DeltaArch:
    """E = cnn_small at width 0.25 (convs 8/16/32, fc 24): P = 32, D_E = 24; D_B = 12."""
    arch = DeltaArch(num_classes=10, in_channels=3, image_size=16, convs=(6, 10), pools=(True, False), se_hidden=4,
                     delta_dim=5, resizer_hidden=7, edge_pool_dim=32, edge_feat_dim=24, feature_dim=12,
                     edge=("cnn_small", (("hidden", 24), ("width", 0.25))))
    return DeltaArch(**{**arch.__dict__, **changes})


def tiny_fused(seed=0, **changes) -> FusedDelta:
    torch.manual_seed(seed)
    return FusedDelta(tiny_arch(**changes)).eval()


# -- the fused forward -----------------------------------------------------------------------------------

def test_fused_forward_is_the_formula_on_a_hand_built_example():
    """logits = C_B((resizer(concat(delta_feat, pool(edge_feat))) + adapter(edge_feat)) / 2), written
    out with plain tensor operations."""
    model = tiny_fused()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    d, e = model.delta, model.edge
    c1, c2 = d.convs()
    # the DELTA branch: conv-ReLU-pool, conv-ReLU, SE with skip, GAP, linear to d
    h = F.max_pool2d(F.relu(F.conv2d(x, c1.weight, c1.bias, padding=1)), 2, ceil_mode=True)
    h = F.relu(F.conv2d(h, c2.weight, c2.bias, padding=1))
    squeeze = h.mean(dim=(2, 3))
    s = torch.sigmoid(F.linear(F.relu(F.linear(squeeze, d.se.fc1.weight, d.se.fc1.bias)), d.se.fc2.weight, d.se.fc2.bias))
    h = h + h * s[:, :, None, None]
    delta_feat = F.linear(h.mean(dim=(2, 3)), d.proj.weight, d.proj.bias)
    # E: its last feature map pooled, and its feature vector
    edge_map = e.features(x)
    edge_pool = edge_map.mean(dim=(2, 3))
    edge_feat = F.relu(F.linear(edge_map.flatten(1), e.fc.weight, e.fc.bias))
    # resizer (2-layer MLP) on the concat, adapter on E's features, average, base classifier
    r1, r2 = model.resizer[0], model.resizer[2]
    resized = F.linear(F.relu(F.linear(torch.cat([edge_pool, delta_feat], 1), r1.weight, r1.bias)), r2.weight, r2.bias)
    adapted = F.linear(edge_feat, model.adapter.weight, model.adapter.bias)
    expected = F.linear((resized + adapted) / 2, model.classifier.weight, model.classifier.bias)
    with torch.no_grad():
        parts = model.branches(x)
        assert torch.allclose(parts.edge_feat, edge_feat, atol=1e-6)
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert torch.allclose(parts.fused, (parts.delta_out + parts.edge_out) / 2)


def test_identity_adapter_feeds_e_features_as_they_are():
    arch = tiny_arch(feature_dim=24, adapter="identity")
    model = FusedDelta(arch).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        parts = model.branches(x)
    assert torch.equal(parts.edge_out, parts.edge_feat)
    with pytest.raises(ValueError, match="identity"):
        tiny_arch(adapter="identity")  # D_E = 24 != D_B = 12


def test_arch_json_round_trip_rebuilds_the_same_shapes():
    arch = tiny_arch()
    again = DeltaArch.from_json(arch.to_json())
    assert again == arch
    assert {k: v.shape for k, v in FusedDelta(again).state_dict().items()} == \
        {k: v.shape for k, v in FusedDelta(arch).state_dict().items()}


def test_counts_match_the_modules():
    arch = tiny_arch()
    model = FusedDelta(arch)
    trainable = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("delta", "resizer", "adapter"))
    assert delta_params(arch) == trainable
    assert delta_macs(arch) > 0


# -- tiers: nested prefixes ----------------------------------------------------------------------------------

def test_tiers_are_nested_prefix_blocks():
    model = tiny_fused()
    arch, full = model.arch, model.trainable_state()
    full_shapes = {n: t.shape for n, t in full.items()}
    previous = None
    for width in WIDTHS:
        shapes = tier_shapes(arch, width)
        assert set(shapes) == set(full)
        keep = tier_keep(full_shapes, shapes)
        for name, shape in shapes.items():
            assert all(s <= f for s, f in zip(shape, full_shapes[name]))
            covered = keep_coordinates(keep[name], full_shapes[name])
            assert int(covered.sum()) == math.prod(shape)
            if previous is not None:  # a narrower tier's coordinates lie inside the wider one's
                assert not (covered & ~previous[name]).any(), name
        cut = tier_slice(full, shapes)
        assert all(torch.equal(cut[n], full[n][covered_index(keep[n])]) for n in cut)
        previous = {n: keep_coordinates(keep[n], full_shapes[n]) for n in keep}
    # fixed sizes stay whole in every tier: image channels and P; the fused coordinates (D_B) and
    # the adapter's edge features (D_E) are cut with the tier
    smallest = tier_shapes(arch, WIDTHS[-1])
    cut = lambda n: math.ceil(WIDTHS[-1] * n)  # noqa: E731
    assert smallest["delta.features.0.weight"][1] == 3
    assert smallest["resizer.0.weight"][1] == arch.edge_pool_dim + cut(arch.delta_dim)
    assert smallest["resizer.2.weight"] == (cut(arch.feature_dim), cut(arch.resizer_hidden))
    assert smallest["adapter.weight"] == (cut(arch.feature_dim), cut(arch.edge_feat_dim))


def test_a_tier_equals_the_full_model_with_the_coordinates_outside_its_prefix_zeroed():
    """HeteroFL's definition of a sub-model, checked by hand: zero every trainable coordinate of the
    full model outside the tier's blocks, and the fused vector of the full model is the tier's."""
    model = tiny_fused(seed=2)
    x = torch.randn(3, 3, 16, 16)
    full = model.trainable_state()
    for width in WIDTHS[1:]:
        shapes = tier_shapes(model.arch, width)
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            for name, t in zeroed.trainable_state().items():
                block = tuple(slice(0, s) for s in shapes[name])
                kept = t[block].clone()
                t.zero_()
                t[block] = kept
            expected = zeroed.branches(x).fused
            tier = tier_model(model, width)
            got = tier.branches(x).fused
        k = tier.arch.out_dim
        assert got.shape == (3, model.arch.feature_dim) and k < model.arch.feature_dim
        assert torch.all(got[:, k:] == 0)
        assert torch.allclose(got, expected, atol=1e-6)
        assert tier(x).shape == (3, 10) and torch.isfinite(tier(x)).all()
    assert set(full) == set(tier.trainable_state())


def test_tier_parameters_fall_with_the_square_of_the_width():
    """Every part a client trains is cut, so on the shipped DELTA's architecture (112,956 parameters,
    half of them the adapter) the smallest tier (1/(2 sqrt 2)) holds at most 20% of the full DELTA's parameters and
    every tier about width**2 of them. On the tiny test DELTA, rounding up and the whole P keep the
    shares higher, but they still fall tier by tier."""
    shipped = DeltaArch(num_classes=10, in_channels=3, image_size=32, convs=(13, 22, 23, 18, 35, 34),
                        pools=(True, True, False, True, False, True),
                        se_hidden=8, delta_dim=32, resizer_hidden=64, edge_pool_dim=128, edge_feat_dim=220,
                        feature_dim=256, edge=("cnn_small", ()))
    full = delta_params(shipped)
    assert full == 112_956
    shares = [delta_params(shipped.scaled(w)) / full for w in WIDTHS[1:]]
    assert shares[-1] <= 0.20, shares
    for width, share in zip(WIDTHS[1:], shares):
        assert width ** 2 <= share <= width ** 2 + 0.05, (width, share)
    tiny = tiny_fused().arch
    tiny_shares = [delta_params(tiny.scaled(w)) for w in WIDTHS]
    assert tiny_shares == sorted(tiny_shares, reverse=True) and len(set(tiny_shares)) == len(WIDTHS)


def covered_index(masks):
    return tuple(slice(0, int(m.sum())) for m in masks)


def test_tier_model_runs_and_its_concat_keeps_all_of_the_edge_pool():
    model = tiny_fused()
    x = torch.randn(2, 3, 16, 16)
    for width in WIDTHS:
        tier = tier_model(model, width)
        with torch.no_grad():
            assert tier(x).shape == (2, 10)
        assert tier.edge is model.edge and tier.classifier is model.classifier
        # the resizer's first P input columns (E's pooled map) are the full model's
        p = model.arch.edge_pool_dim
        assert torch.equal(tier.resizer[0].weight[:, :p], model.resizer[0].weight[: tier.arch.resizer_hidden, :p])


def test_tier_branches_equal_the_tier_model_and_train_the_full_prefix():
    model = tiny_fused(seed=1)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        pool, feat = model.edge_outputs(x)
    for width in WIDTHS[1:]:
        through_views = TierBranches(model, width)(x, pool, feat)
        with torch.no_grad():
            expected = tier_model(model, width).branches(x)
        assert torch.allclose(through_views.fused, expected.fused, atol=1e-6)
    model.zero_grad()
    TierBranches(model, WIDTHS[-1])(x, pool, feat).fused.square().sum().backward()
    grad = model.delta.proj.weight.grad  # [d, C]: only the narrow tier's block moves
    d, c = tier_model(model, WIDTHS[-1]).delta.proj.weight.shape
    assert grad[:d, :c].abs().sum() > 0 and grad[d:].abs().sum() == 0 and grad[:, c:].abs().sum() == 0


def test_translation_keeps_shape_and_moves_by_at_most_shift():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0
    moved = translate(image.expand(50, 1, 9, 9), 2, torch.Generator().manual_seed(0))
    assert moved.shape == (50, 1, 9, 9)
    rows, cols = moved[:, 0].flatten(1).argmax(1) // 9, moved[:, 0].flatten(1).argmax(1) % 9
    assert (rows - 4).abs().max() <= 2 and (cols - 4).abs().max() <= 2 and len(set(zip(rows.tolist(), cols.tolist()))) > 10


def test_order_by_importance_keeps_the_function_and_sorts_filters():
    model = tiny_fused(seed=3)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        order_by_importance(model)
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)
    for conv in model.delta.convs():
        norms = conv.weight.flatten(1).norm(dim=1)
        assert torch.all(norms[:-1] >= norms[1:])
    for weights in (model.delta.se.fc1.weight, model.delta.proj.weight, model.resizer[0].weight):
        norms = weights.norm(dim=1)
        assert torch.all(norms[:-1] >= norms[1:])


# -- losses ------------------------------------------------------------------------------------------------------

def test_fnc_is_the_mean_feature_wise_correlation_and_trains_only_the_delta():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 5, generator=g)
    r = (-2.0 * a + 0.5).requires_grad_(True)  # perfectly anti-correlated, feature by feature
    assert fnc_loss(r, a).item() == pytest.approx(-1.0, abs=1e-5)
    assert float(fnc_loss(a.clone(), a)) == pytest.approx(1.0, abs=1e-5)
    edge = a.clone().requires_grad_(True)
    fnc_loss(torch.randn(16, 5, generator=g, requires_grad=True), edge).backward()
    assert edge.grad is None  # E's side is detached


def test_group_lasso_sums_filter_and_channel_norms():
    model = tiny_fused()
    expected = sum(c.weight.flatten(1).norm(dim=1).sum() + c.weight.transpose(0, 1).flatten(1).norm(dim=1).sum()
                   for c in model.delta.convs())
    assert float(group_lasso(model.delta)) == pytest.approx(float(expected), rel=1e-6)


def test_correlation_scores_use_edge_wrong_base_right_samples():
    y = torch.tensor([0, 1, 0, 1])
    edge = torch.tensor([[0.0, 1], [1, 0], [1, 0], [0, 1]])  # wrong, wrong, right, right
    base = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]])  # right, wrong, right, right
    a = torch.randn(4, 3)
    scores = correlation_scores({"delta_out": -a, "edge_out": a}, edge, base, y)
    assert scores["edge_wrong_base_right"] == 1  # sample 0 only; fewer than 2: no subset score
    assert "feature_wise_subset" not in scores and scores["feature_wise_all"] == pytest.approx(-1.0, abs=1e-5)


# -- extraction ------------------------------------------------------------------------------------------------

def _tiny_base():
    torch.manual_seed(0)
    return get_model("vgg8", num_classes=10, width=0.125).eval()  # convs 8/16/32/64/64


def test_blocks_and_rate_masks():
    blocks = blocks_of(_tiny_base())
    assert [b.layer for b in blocks] == ["features.0", "features.4", "features.8", "features.12", "features.16"]
    assert all(b.norm and b.act and b.pool for b in blocks)
    norms = torch.tensor([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0])
    masks = rate_masks(norms, CONV_RATES)
    assert masks.sum(1).tolist() == [7, 6, 5, 4, 3, 2, 1]  # C - round(0.125k C)
    assert masks[-1, 5] == 1 and masks[:, 1].sum() == 0  # the largest always kept, the smallest never
    assert kept_count(8, 0.5) == 4 and kept_count(8, 0.99) == 1


def test_learned_sparsity_prunes_physically_to_the_kept_counts():
    base = _tiny_base()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    settings = ExtractSettings(epochs=1, batch_size=16)
    extraction = learn_sparsity(base, x, y, settings, seed=0)
    for weights, sparsity in zip(extraction.weights, extraction.sparsity):
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
        assert min(CONV_RATES) - 1e-6 <= sparsity <= max(CONV_RATES) + 1e-6
    assert all(p.requires_grad for p in base.parameters()), "the caller's base is not touched"
    pruned = prune_base(base, extraction, x[:1])
    convs = [pruned.get_submodule(b.layer) for b in extraction.blocks]
    assert [c.out_channels for c in convs] == extraction.kept
    # the kept filters are the largest-norm ones of the base, in their original order
    first = base.get_submodule("features.0").weight
    order = torch.argsort(first.flatten(1).norm(dim=1), descending=True, stable=True)[: extraction.kept[0]]
    assert torch.equal(convs[0].weight, first[order.sort().values])
    assert pruned(x[:2]).shape == (2, 10)


def test_fold_block_equals_conv_then_eval_batchnorm():
    conv, norm = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    norm.eval()
    x = torch.randn(2, 3, 8, 8)
    weight, bias = fold_block(conv, norm)
    with torch.no_grad():
        assert torch.allclose(F.conv2d(x, weight, bias, padding=1), norm(conv(x)), atol=1e-5)


def test_depth_is_the_most_blocks_within_the_budget():
    arch_of = lambda depth: tiny_arch(convs=(4,) * depth, pools=(False,) * depth)  # noqa: E731
    budgets = [delta_params(arch_of(d)) for d in (1, 2, 3)]
    assert choose_depth([4, 4, 4], [False] * 3, arch_of, budgets[1]) == 2
    assert choose_depth([4, 4, 4], [False] * 3, arch_of, budgets[2] + 1) == 3
    assert choose_depth([4, 4, 4], [False] * 3, arch_of, 1) == 1  # nothing fits: one block, with a warning


# -- the whole pipeline on a tiny pair --------------------------------------------------------------------

TINY_DATA = {"name": "synthetic", "root": None, "samples_per_client": 4, "test_size": 48, "difficulty": 0.5}


def tiny_pair_spec(**changes) -> PairSpec:
    options = {"data": TINY_DATA, "seed": 0, "server_samples": 48,
               "base": {"name": "vgg8", "width": 0.125}, "edge": {"name": "cnn_small", "width": 0.25, "hidden": 16},
               "base_recipe": {"epochs": 1, "lr": 0.05}, "edge_recipe": {"epochs": 1, "lr": 0.02}, **changes}
    return PairSpec.from_options(options)


def tiny_construction(**train) -> ConstructionSpec:
    return ConstructionSpec.from_options({
        "extract": {"epochs": 1, "finetune": {"epochs": 1, "lr": 0.01}, "budget": 1.0, "delta_dim": 6,
                    "resizer_hidden": 8},
        "train": {"epochs": 1, **train}, "kd": {"epochs": 1}})


def test_construction_reports_every_figure_and_is_cached(tmp_path):
    built = ensure_delta(tiny_pair_spec(), tiny_construction(), str(tmp_path))
    report = built.report
    for key in ("base_accuracy", "edge_accuracy", "fused_accuracy", "gain_over_edge", "P_D/E", "F_D/E", "P_D/B",
                "F_D/B", "kd_edge_accuracy", "correlation", "tiers", "extraction"):
        assert key in report, key
    base = get_model("vgg8", num_classes=10, width=0.125)
    assert report["params"]["base"] == model_profile(base)["params"]
    assert report["params"]["delta"] == delta_params(built.arch) == sum(report["params"]["delta_parts"].values())
    assert report["P_D/B"] == pytest.approx(report["params"]["delta"] / report["params"]["base"])
    assert list(report["tiers"]) == [f"{w:.4f}" for w in WIDTHS]
    # the base classifier inside the fused model is the pair's, untouched
    pair_base = torch.load(built.directory.parent / "base.pt", weights_only=True)
    assert torch.equal(built.state["classifier.weight"], pair_base["classifier.weight"])
    again = ensure_delta(tiny_pair_spec(), tiny_construction(), str(tmp_path))  # from the cache
    assert again.directory == built.directory and again.arch == built.arch
    assert all(torch.equal(again.state[k], built.state[k]) for k in built.state)
    other = ensure_delta(tiny_pair_spec(), tiny_construction(fnc=0.1), str(tmp_path))  # same pair, new DELTA
    assert other.directory.parent == built.directory.parent and other.directory != built.directory


def test_slimmable_training_with_translation_builds_every_tier(tmp_path):
    built = ensure_delta(tiny_pair_spec(), tiny_construction(slimmable=True, shift=2), str(tmp_path))
    history = built.report["train_history"]
    assert history[-1]["tier_mse"] > 0 and all(math.isfinite(v) for v in history[-1].values())
    assert set(built.report["tiers"]) == {f"{w:.4f}" for w in WIDTHS}


def test_the_budget_truncates_the_subgraph(tmp_path):
    spec = tiny_construction()
    loose = ensure_delta(tiny_pair_spec(), spec, str(tmp_path))
    tight = ConstructionSpec(extract=dataclasses.replace(spec.extract, budget=0.5 * loose.report["P_D/B"]),
                             train=spec.train, kd=None)
    built = ensure_delta(tiny_pair_spec(), tight, str(tmp_path))
    assert len(built.arch.convs) < len(loose.arch.convs)
    assert built.report["P_D/B"] <= 0.5 * loose.report["P_D/B"] or len(built.arch.convs) == 1


def test_pretrain_command_prints_the_report_and_fills_the_cache(tmp_path, capsys):
    from fl.delta.pretrain import main
    from tests.test_delta_strategy import TINY

    args = ["sim=delta_100clients", f"model.cache_dir={tmp_path}", "data.samples_per_client=4", "data.test_size=48",
            *TINY]
    assert main(args + ["--json", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "| edge + DELTA (fused) accuracy |" in out and "| P_D/B, F_D/B |" in out
    assert (tmp_path / "report.json").exists() and list(tmp_path.glob("pair-*/delta-*/fused.pt"))
    assert main(["sim=delta_100clients", "model=vgg8"]) == 2  # nothing to pretrain: a one-line error


def test_a_server_split_of_another_difficulty_is_another_pair():
    from fl.delta.pair import pair_directory, server_split

    shifted = tiny_pair_spec(server_difficulty=0.0)
    train, test = server_split(shifted)
    same_train, same_test = server_split(tiny_pair_spec())
    assert train.difficulty == 0.0 and same_train.difficulty == TINY_DATA["difficulty"]
    assert test.difficulty == same_test.difficulty == TINY_DATA["difficulty"]  # the clients' task is unchanged
    assert pair_directory(shifted, "c") != pair_directory(tiny_pair_spec(), "c")
    for bad in (1.5, "abc", True):
        with pytest.raises(ConfigError, match="model.pair.server_difficulty"):
            tiny_pair_spec(server_difficulty=bad)
    with pytest.raises(ConfigError, match="model.pair.server_difficulty"):
        tiny_pair_spec(server_difficulty=0.0, data={**TINY_DATA, "name": "mnist"})


def test_a_shifted_build_reports_its_accuracy_on_the_servers_own_data(tmp_path, capsys):
    """Under a server shift the report holds base, edge and fused accuracy on held-out scenes of
    the server's difficulty (not the task's test set); a build cached before that field existed
    gains it on load, with the same figures, and the printed report shows it."""
    from fl.delta.pair import server_domain_test
    from fl.delta.pretrain import format_report

    shifted = tiny_pair_spec(server_difficulty=0.0)
    assert server_domain_test(tiny_pair_spec()) is None
    held_out = server_domain_test(shifted)
    assert held_out.difficulty == 0.0 and len(held_out) == TINY_DATA["test_size"]
    built = ensure_delta(shifted, tiny_construction(), str(tmp_path))
    domain = built.report["server_domain"]
    assert domain["difficulty"] == 0.0 and domain["test_samples"] == TINY_DATA["test_size"]
    assert domain["gap_to_base"] == pytest.approx(domain["base_accuracy"] - domain["fused_accuracy"])
    report_file = built.directory / "report.json"
    old = {k: v for k, v in built.report.items() if k != "server_domain"}
    report_file.write_text(json.dumps(old))
    again = ensure_delta(shifted, tiny_construction(), str(tmp_path))
    assert again.report["server_domain"] == pytest.approx(domain)
    assert "server_domain" in json.loads(report_file.read_text())
    assert "on the server's own data (difficulty 0.0, 48 held-out images)" in format_report(again.report)
    assert "server_domain" not in ensure_delta(tiny_pair_spec(), tiny_construction(), str(tmp_path)).report
