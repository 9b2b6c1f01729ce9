"""Geometry metrics of the final layer (plugins/geometry): values against a brute-force loop,
margin sign against correctness, NaN for zero features, corruptions, the plugin's report."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from plugins.geometry.corruptions import CORRUPTIONS, corrupt
from plugins.geometry.metrics import Geometry, capture_linear_io, measure, sample_geometry, shift, summarize


class TinyNet(nn.Module):
    """A zoo-shaped model: ``forward_features`` then ``classifier``."""

    def __init__(self, d_in=12, d=6, classes=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(d_in, d)
        self.classifier = nn.Linear(d, classes)

    def forward_features(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


def _data(n=200, d_in=12, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(classes, (n,), generator=g)


def _batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def test_values_match_a_brute_force_loop():
    model = TinyNet()
    x, y = _data()
    geo = measure(model, _batches(x, y, 37))  # uneven batches
    W, b = model.classifier.weight.detach().double(), model.classifier.bias.detach().double()
    features = model.forward_features(x).detach().double()
    for i in range(len(y)):
        f, c = features[i], int(y[i])
        length = math.sqrt(sum(v * v for v in f.tolist()))
        angles = [math.degrees(math.acos(float(f @ W[k]) / (length * float(W[k].norm())))) for k in range(len(W))]
        margin = min(float((W[c] - W[j]) @ f + b[c] - b[j]) / float((W[c] - W[j]).norm())
                     for j in range(len(W)) if j != c)
        assert geo.length[i].item() == pytest.approx(length, rel=1e-5)
        assert geo.angle[i].item() == pytest.approx(angles[c], abs=1e-3)
        assert np.allclose(geo.angles[i].numpy(), angles, atol=1e-3)
        assert geo.margin[i].item() == pytest.approx(margin, rel=1e-4, abs=1e-6)


def test_margin_sign_agrees_with_correctness_for_every_sample():
    model = TinyNet(classes=7, seed=3)
    x, y = _data(n=2000, classes=7, seed=4)
    geo = measure(model, _batches(x, y, 256))
    logits = model(x)
    assert torch.equal(geo.correct, logits.argmax(1) == y)
    assert 0 < geo.correct.sum() < len(y)  # both kinds present
    assert torch.all((geo.margin > 0) == geo.correct)
    assert torch.all((geo.margin < 0) == ~geo.correct)


def test_zero_feature_vectors_give_nan_angles_not_a_crash():
    weight = torch.randn(4, 3)
    bias = torch.tensor([0.5, -0.2, 0.1, 0.0])
    features = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -1.0]])
    logits = features @ weight.T + bias
    geo = sample_geometry(features, logits, weight, torch.tensor([0, 2]))
    assert geo.length[0] == 0 and torch.isnan(geo.angle[0]) and torch.isnan(geo.angles[0]).all()
    assert torch.isfinite(geo.angles[1]).all()
    # the margin of the zero vector is the bias term alone: min_j (b_0 - b_j) / ||W_0 - W_j||
    expected = min((bias[0] - bias[j]) / (weight[0] - weight[j]).norm() for j in (1, 2, 3))
    assert geo.margin[0].item() == pytest.approx(expected.item(), rel=1e-5)
    stats = summarize(geo, 4)
    assert math.isfinite(stats["angle_mean"])  # NaN angles are left out of the means


def test_hook_reads_the_input_of_the_classifier_and_is_removed():
    from fl.models import get_model

    torch.manual_seed(0)
    model = get_model("cnn_small", num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with capture_linear_io(model) as io:
        logits = model(x)
    assert torch.equal(io["x"], model.forward_features(x))
    assert torch.equal(io["z"], logits)
    assert not model.classifier._forward_hooks


def test_memory_is_per_sample_times_classes():
    model = TinyNet(classes=5)
    x, y = _data(n=50)
    geo = measure(model, _batches(x, y, 50))
    assert geo.angles.shape == (50, 5) and geo.margin.shape == (50,)


def test_shift_counts_flips_and_mean_changes():
    labels = torch.tensor([0, 0, 1, 1])
    before = Geometry(length=torch.tensor([1.0, 2.0, 3.0, 4.0]), angle=torch.tensor([10.0, 20.0, 30.0, float("nan")]),
                      angles=torch.zeros(4, 2), margin=torch.tensor([1.0, -1.0, 1.0, -1.0]), labels=labels,
                      predicted=torch.tensor([0, 1, 1, 0]))
    after = Geometry(length=torch.tensor([2.0, 2.0, 3.0, 6.0]), angle=torch.tensor([20.0, 20.0, 30.0, 40.0]),
                     angles=torch.zeros(4, 2), margin=torch.tensor([-1.0, 1.0, 1.0, -2.0]), labels=labels,
                     predicted=torch.tensor([1, 0, 1, 0]))
    out = shift(before, after, 2)
    assert out["right_to_wrong"] == 1 and out["wrong_to_right"] == 1
    assert out["delta_length"] == pytest.approx(0.75)
    assert out["delta_angle"] == pytest.approx(10 / 3)  # the NaN pair is left out
    assert out["class0/delta_margin"] == pytest.approx(0.0) and out["class1/delta_margin"] == pytest.approx(-0.5)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_grow_with_severity_and_stay_in_range(name):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 32, generator=g)
    changes = []
    for severity in range(1, 6):
        out = corrupt(images, name, severity, torch.Generator().manual_seed(1))
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        changes.append((out - images).abs().mean().item())
    assert all(a <= b + 1e-6 for a, b in zip(changes, changes[1:])) and changes[0] > 0
    again = corrupt(images, name, 3, torch.Generator().manual_seed(1))
    assert torch.equal(again, corrupt(images, name, 3, torch.Generator().manual_seed(1)))


def test_corruption_rejects_unknown_names_and_severities():
    with pytest.raises(ValueError, match="allowed"):
        corrupt(torch.rand(1, 3, 4, 4), "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(torch.rand(1, 3, 4, 4), "contrast", 6)


def test_misclassified_samples_have_larger_angle_and_smaller_length():
    """The paper's observation, on a small CNN trained briefly on the synthetic data."""
    from fl.local_training import ClientData, TrainHyper, train_dense
    from fl.data import build_federation
    from fl.models import get_model

    federation = build_federation("synthetic", num_clients=1, seed=0, samples_per_client=1200, test_size=500,
                                  difficulty=0.0)
    torch.manual_seed(0)
    model = get_model("cnn_small", num_classes=10, width=0.5, hidden=64)
    train_dense(model, ClientData(federation.train, np.arange(len(federation.train))),
                TrainHyper(epochs=8, batch_size=32, lr=0.02, momentum=0.9), torch.Generator().manual_seed(0))
    test = ClientData(federation.test, np.arange(len(federation.test)))
    geo = measure(model, test.batches(250, None))
    stats = summarize(geo, 10)
    assert 0.2 < stats["accuracy"] < 0.95, stats["accuracy"]  # trained, and with mistakes to compare
    assert stats["wrong/angle_mean"] > stats["correct/angle_mean"]
    assert stats["wrong/length_mean"] < stats["correct/length_mean"]
    assert stats["correct/margin_mean"] > 0 > stats["wrong/margin_mean"]


# -- figures ---------------------------------------------------------------------------------------

def test_the_scatter_draws_one_point_per_evaluated_sample():
    from plugins.geometry.views import class_views
    from tests.test_figures import assert_picture

    model = TinyNet()
    x, y = _data(n=150)
    geo = measure(model, _batches(x, y, 40))
    images, drawn = class_views({"model": geo}, [f"c{c}" for c in range(5)], 10, "model")
    assert drawn == len(geo) == 150
    assert set(images) == {"angle_vs_length", "margin_by_class"}
    for image in images.values():
        assert_picture(image)
    _, drawn = class_views({"model": geo}, [f"c{c}" for c in range(5)], 2, "model")
    assert drawn == int((geo.labels < 2).sum())  # max_classes: the first two classes only


def test_plugin_figures_in_tensorboard_and_the_run_directory(tmp_path):
    """plugins=[geometry,compression] with a followed client: the global views every round, the
    client's shift, and the dense-vs-compressed views at the last round; TensorBoard image tags
    and PNG files that decode, and a scatter with one point per evaluated sample."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    from fl.run_logger import image_path
    from tests.helpers import run_inprocess
    from tests.test_figures import assert_picture

    summary, run_dir = run_inprocess(tmp_path, [
        "plugins=[geometry,compression]", "plugins.geometry.samples=48", "plugins.geometry.clients=[1]",
        "plugins.compression.quantization=none", "plugins.compression.sweep=[]", "tensorboard=true"])
    assert summary["status"] == "complete"
    events = EventAccumulator(str(run_dir), size_guidance={IMAGES: 0, SCALARS: 0}).Reload()
    p = "plugin/geometry/"
    steps = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert steps[p + "global/angle_vs_length"] == steps[p + "global/margin_by_class"] == [0, 1, 2]
    assert steps[p + "client1/shift"] == [1, 2]
    assert steps[p + "compressed/angle_vs_length"] == steps[p + "compressed/margin_by_class"] == [2]  # compression's
    # TensorBoard files a tag under one kind: an image sharing a histogram's or scalar's tag would not show
    assert not set(steps) & (set(events.Tags()["histograms"]) | set(events.Tags()["scalars"]))
    assert steps["plugin/compression/tradeoff"] == [2]
    for tag, tag_steps in steps.items():
        plugin, key = tag.split("/", 2)[1:]
        for step in tag_steps:
            assert_picture(image_path(run_dir, plugin, key, step).read_bytes())
    drawn = [e.value for e in events.Scalars(p + "global/scatter_points")]
    assert drawn == [e.value for e in events.Scalars(p + "global/count")] == [48.0, 48.0, 48.0]


def test_plugin_figure_options_are_checked():
    from plugins.geometry import GeometryMonitor

    with pytest.raises(ValueError, match="geometry.max_classes must be >= 1"):
        GeometryMonitor(max_classes=0)
    with pytest.raises(ValueError, match="geometry.compression .*compression.structured_ratio must be in"):
        GeometryMonitor(compression={"_target_": "plugins.compression.ModelCompression", "structured_ratio": 2})
    assert GeometryMonitor(figures=False).compression is None
