"""AgileNN split training (plugins/agilenn, strategies/agilenn.py, clients/agilenn_trainer.py,
fl/payload/features.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from torch import nn

from fl.payload import (FEATURE_CODED, coded_bytes_per_sample, decode_features, decode_indices, encode_features,
                        encode_indices, encode_tensors, payload_bytes)
from plugins.agilenn.importance import (ZeroBaselineCache, captum_ig, channel_importance, integrated_gradients,
                                        per_sample_loss)
from plugins.agilenn.losses import disorder_loss, disorder_rate, objective, skewness, skewness_loss
from plugins.agilenn.network import AgileNet, agilenn
from plugins.agilenn.quantize import CentroidQuantizer
from plugins.agilenn.selection import permute_channels, ranking, topk_counts
from plugins.agilenn.training import AgileHyper, AgileLoss

from tests.helpers import compose_config, run_inprocess


def small_reference(channels=6, classes=4) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, classes)).double()
    return net.requires_grad_(False).eval()


def tiny_model(**kw) -> AgileNet:
    torch.manual_seed(0)
    model = agilenn(num_classes=4, **kw)
    model.freeze_reference(True)
    return model


# -- importance -------------------------------------------------------------------------------

def test_ig_equals_captum_trapezoid_two_points():
    ref = small_reference()
    f = torch.rand(5, 6, 4, 4, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 3, 1])
    ours = integrated_gradients(ref, f, y, ZeroBaselineCache(), 4, create_graph=False)
    raw = captum_ig(ref, f, y, n_steps=2, rescale=False)
    # captum's trapezoid step sizes are 1/n halved at both ends (1/4, 1/4 for n = 2): half of ours
    assert torch.allclose(ours, 2 * raw, atol=1e-12, rtol=1e-10)
    assert torch.allclose(ours, captum_ig(ref, f, y, n_steps=2), atol=1e-12, rtol=1e-10)
    # and ours is the trapezoid rule itself: f * (g(0) + g(f)) / 2
    g0 = torch.autograd.functional.jacobian(lambda z: per_sample_loss(ref, z, y).sum(), torch.zeros_like(f))
    g1 = torch.autograd.functional.jacobian(lambda z: per_sample_loss(ref, z, y).sum(), f)
    assert torch.allclose(ours, f * (g0 + g1) / 2, atol=1e-12)
    assert not torch.allclose(ours, f * g1, atol=1e-6)
    # a third point changes the value, so the check above does pin n_steps=2
    assert not torch.allclose(captum_ig(ref, f, y, n_steps=3), ours, atol=1e-8)


def test_zero_baseline_cache_is_per_class_and_follows_the_reference():
    ref = small_reference()
    cache = ZeroBaselineCache()
    grads = cache.get(ref, (6, 4, 4), 4)
    for c in range(4):
        zero = torch.zeros(1, 6, 4, 4, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(per_sample_loss(ref, zero, torch.tensor([c])).sum(), zero)
        assert torch.allclose(grads[c], g[0])
    assert not torch.allclose(grads[0], grads[1])
    assert cache.get(ref, (6, 4, 4), 4) is grads  # cached
    with torch.no_grad():
        ref[4].bias.add_(torch.arange(4.0, dtype=torch.float64))  # new weights (not a softmax-invariant shift)
    assert not torch.allclose(cache.get(ref, (6, 4, 4), 4), grads)


def test_gradients_reach_the_extractor_through_the_importance():
    model = tiny_model()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    agile = AgileLoss(AgileHyper(), 4)

    def regularizer_grads(create_graph):
        model.zero_grad(set_to_none=True)
        f = model.extractor(x)
        ig = integrated_gradients(model.reference, f, y, agile.cache, 4, create_graph=create_graph)
        imp = channel_importance(ig)
        (skewness_loss(imp, model.k, 0.99) + disorder_loss(imp, model.k)).backward()
        return torch.cat([p.grad.flatten() for p in model.extractor.parameters()])

    full = regularizer_grads(True)
    assert full.abs().sum() > 0 and torch.isfinite(full).all()
    # with double backprop the gradient also goes through d loss / d f; without it, it differs
    assert not torch.allclose(full, regularizer_grads(False), rtol=1e-3, atol=1e-9)
    assert all(p.grad is None for p in model.reference.parameters())  # the reference stays frozen


# -- losses -------------------------------------------------------------------------------------

def test_losses_zero_when_the_constraint_holds_and_positive_when_violated():
    k = 2
    holds = torch.tensor([[5.0, 4.0, 0.5, 0.5]])  # share 0.9, every local channel above every remote one
    assert float(skewness(holds, k)) == pytest.approx(0.9)
    assert float(skewness_loss(holds, k, 0.8)) == 0.0
    assert float(disorder_loss(holds, k)) == 0.0
    assert float(disorder_rate(holds, k)) == 0.0
    low_share = torch.tensor([[3.0, 3.0, 2.0, 2.0]])  # ordered, but share 0.6 < 0.8
    assert float(skewness_loss(low_share, k, 0.8)) == pytest.approx(0.2)
    assert float(disorder_loss(low_share, k)) == 0.0
    disordered = torch.tensor([[8.0, 0.5, 1.0, 0.5]])  # share 0.85 >= 0.8 but channel 2 > channel 1
    assert float(skewness_loss(disordered, k, 0.8)) == 0.0
    assert float(disorder_loss(disordered, k)) == pytest.approx((1.0 - 0.5) / 10.0)
    assert float(disorder_rate(disordered, k)) == 1.0
    logits, y = torch.randn(1, 3), torch.tensor([1])
    total, parts = objective(logits, y, disordered, k, 0.8, 0.8)
    assert float(total) == pytest.approx(0.8 * float(F.cross_entropy(logits, y)) + 0.2 * 0.05, rel=1e-6)


# -- network, alpha, quantizer, selection ------------------------------------------------------

def test_combination_alpha_is_sigmoid_of_w_over_t():
    model = tiny_model(temperature=4.0)
    with torch.no_grad():
        model.alpha_w.fill_(2.0)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    f, local, remote, combined = model.split_outputs(x)
    a = torch.sigmoid(torch.tensor(2.0 / 4.0))
    assert torch.allclose(combined, a * local + (1 - a) * remote, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model(x), combined, atol=1e-6)  # the zoo forward is the combined prediction
    assert model.k == 5 and f.shape[1] == 24 and f.shape[2:] == (8, 8)


def test_quantizer_straight_through():
    q = CentroidQuantizer(4)
    with torch.no_grad():
        q.centroids.copy_(torch.tensor([2.0, 0.0, 1.0, 3.0]))  # unsorted on purpose
    x = torch.tensor([0.1, 0.9, 1.6, 2.4, 5.0], requires_grad=True)
    out = q(x)
    assert torch.equal(out.detach(), torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0]))  # exactly the centroids
    assert torch.equal(q.indices(x), torch.tensor([0, 1, 2, 2, 3], dtype=torch.uint8))
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)  # straight through
    # centroid j gets the summed gradient of the values it holds (c[0] = 2.0 holds 1.6 and 2.4)
    assert torch.equal(q.centroids.grad, torch.tensor([7.0, 1.0, 2.0, 5.0]))


def test_algorithm1_puts_the_most_frequent_topk_channels_first_and_keeps_the_reference_function():
    importance = torch.tensor([[0.1, 5.0, 0.2, 3.0], [0.3, 4.0, 2.0, 0.1], [0.1, 0.2, 6.0, 5.0]])
    counts = topk_counts(importance, 2)
    assert counts.tolist() == [0, 2, 2, 2]
    assert ranking(counts).tolist() == [1, 2, 3, 0]  # ties by channel index
    model = tiny_model()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f0, r0 = model.extractor(x), model.reference_logits(x)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    permute_channels(model, order)
    with torch.no_grad():
        assert torch.allclose(model.extractor(x), f0[:, order], atol=1e-6)
        assert torch.allclose(model.reference_logits(x), r0, atol=1e-5)


# -- lossless coder and bytes ---------------------------------------------------------------------

@pytest.mark.parametrize("levels,shape", [(8, (19, 8, 8)), (8, (16, 19, 8, 8)), (2, (7,)), (256, (3, 5)),
                                          (5, (1, 1, 1))])
def test_coder_round_trips_exactly(levels, shape):
    rng = np.random.default_rng(levels)
    for indices in (rng.integers(0, levels, size=shape), np.zeros(shape, dtype=np.int64),
                    np.minimum(rng.geometric(0.6, size=shape) - 1, levels - 1)):
        indices = indices.astype(np.uint8)
        decoded, got_levels = decode_indices(encode_indices(indices, levels))
        assert got_levels == levels and decoded.shape == indices.shape and np.array_equal(decoded, indices)
    with pytest.raises(ValueError):
        encode_indices(np.full(shape, levels, dtype=np.uint8) if levels < 256 else np.zeros(0, np.uint8), 1)


def test_coder_compresses_skewed_indices_and_never_exceeds_packed_size():
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 8, size=(19, 8, 8)).astype(np.uint8)
    skewed = np.minimum(rng.geometric(0.8, size=(19, 8, 8)) - 1, 7).astype(np.uint8)
    header = 6 + 4 * 3
    assert len(encode_indices(uniform, 8)) <= header + 19 * 64 * 3 // 8
    assert len(encode_indices(skewed, 8)) < 0.6 * (header + 19 * 64 * 3 // 8)


def test_byte_counts_equal_the_coded_payload():
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 3, size=(6, 19, 8, 8)).astype(np.uint8)
    per_sample = coded_bytes_per_sample(indices, 8)
    assert per_sample.tolist() == [len(encode_indices(s, 8)) for s in indices]
    codebook = torch.linspace(0, 3, 8)
    record = encode_features(torch.from_numpy(indices), codebook)
    stream = encode_indices(indices, 8)
    assert record[FEATURE_CODED].numpy().tobytes() == stream  # the message carries exactly the coded stream
    npy_header = len(record[FEATURE_CODED].data) - len(stream)
    assert 0 < npy_header <= 128
    content = RecordDict({"arrays": record})
    expected = len("arrays") + sum(len(k) + len(a.data) for k, a in record.items())
    assert payload_bytes(content) == expected == len("arrays") + record.count_bytes()
    got, book = decode_features(record)
    assert torch.equal(got, torch.from_numpy(indices).long()) and torch.equal(book, codebook)


# -- split learning: the exchanged gradients give the joint gradient ------------------------------

def test_split_exchange_gradients_equal_the_joint_agilenn_gradient():
    from plugins.agilenn.protocol import GRAD_ALPHA, GRAD_FEATURES, GRAD_LOCAL
    from fl.payload import decode_tensors
    from strategies.agilenn import AgileNN

    model = tiny_model()
    model.train()
    hyper = AgileHyper(rho=0.9, lam=0.7)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    agile = AgileLoss(hyper, 4)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss, _, _ = agile(model, x, y)
    loss.backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for n, b in model.named_buffers():
        b.copy_(buffers[n])

    # the client's forward message, the server's step (lr 0: the gradients only), the client's backward
    f = model.extractor(x)
    local = model.local(f[:, :model.k])
    record = encode_features(model.quantizer.indices(f[:, model.k:]), model.quantizer.codebook())
    for name, array in encode_tensors({"local": local, "labels": y, "alpha_w": model.alpha_w.detach().reshape(1)}).items():
        record[name] = array
    strategy = AgileNN(rho=hyper.rho, lam=hyper.lam)
    server_model = tiny_model()
    server_model.load_state_dict(model.state_dict())
    server_model.train()
    grads = decode_tensors(strategy.server_step(server_model, torch.optim.SGD(server_model.remote.parameters(), lr=0.0),
                                                record))
    importance = agile.importance(model, f, y)
    reg = (1 - hyper.lam) * (skewness_loss(importance, model.k, hyper.rho) + disorder_loss(importance, model.k))
    q = model.quantizer(f[:, model.k:])
    torch.autograd.backward([reg, local, q, model.alpha_w],
                            [torch.ones(()), grads[GRAD_LOCAL], grads[GRAD_FEATURES], grads[GRAD_ALPHA].reshape(())])
    for name in [n for n in joint if not n.startswith("remote.")]:
        assert torch.allclose(model.get_parameter(name).grad, joint[name], rtol=1e-4, atol=1e-6), name
    for name in [n for n in joint if n.startswith("remote.")]:
        assert torch.allclose(server_model.get_parameter(name).grad, joint[name], rtol=1e-4, atol=1e-6), name


# -- the plugin in the federation -----------------------------------------------------------------

def test_plugin_config_selects_the_agilenn_strategy_and_model():
    cfg = compose_config(["plugins=[agilenn]"])
    assert cfg.strategy._target_ == "strategies.agilenn.AgileNN" and cfg.model.name == "agilenn"
    assert cfg.plugins.agilenn._target_ == "plugins.agilenn.AgileNNMonitor"


@pytest.mark.parametrize("remote", ["fedavg", "split"])
def test_end_to_end_plugins_agilenn(tmp_path, remote):
    overrides = ["plugins=[agilenn]", f"strategy.remote={remote}", "strategy.pretrain_rounds=1",
                 "plugins.agilenn.samples=32", "data.test_size=32"]
    summary, run_dir = run_inprocess(tmp_path, overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    last = rows[-1]
    for key in ("skewness", "disorder_rate", "alpha", "local_accuracy", "remote_accuracy", "combined_accuracy",
                "bytes_per_sample", "captum_max_abs_diff"):
        assert np.isfinite(last[f"plugin/agilenn/{key}"]), key
    assert 0 < last["plugin/agilenn/bytes_per_sample"] < last["plugin/agilenn/raw_bytes_per_sample"]
    assert last["plugin/agilenn/captum_max_abs_diff"] < 1e-2
    assert 0 <= last["train/skewness"] <= 1 and last["up_bytes"] > 0 and last["down_bytes"] > 0
    assert "train/selection_topk_count_share" in rows[1]
    pretrain_up = rows[1]["up_bytes"]
    if remote == "fedavg":
        assert last["train/step_overhead"] > 0 and last["plugin/agilenn/step_overhead"] == last["train/step_overhead"]
        assert last["up_bytes"] == pytest.approx(pretrain_up, rel=1e-3)  # the whole model both rounds
    else:  # coded features + the device part up, instead of the whole model (the remote head dominates)
        assert last["up_bytes"] < pretrain_up / 2
    assert summary["rounds"] == 2
