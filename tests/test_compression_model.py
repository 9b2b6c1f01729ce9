"""Model compression for edge clients (plugins/compression): structured pruning with
torch-pruning and its state_dict helpers, permanent unstructured pruning, post-training
quantization, and the plugin's before/after table."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fl.models import get_model, model_profile
from plugins.compression import (ModelCompression, load_pruned, quantize, save_pruned, structured_prune,
                                 unstructured_prune)
from plugins.compression.techniques import count_params, quantized_engine, serialized_size

EXAMPLE = torch.zeros(1, 3, 32, 32)


def _model(name="cnn_small", seed=0):
    torch.manual_seed(seed)
    return get_model(name, num_classes=10).eval()


@pytest.mark.parametrize("name", ["cnn_small", "resnet8"])
def test_structured_pruning_removes_channels_and_reloads_with_torch_pruning(name):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = structured_prune(model, EXAMPLE, 0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched
    full, small = model_profile(model), model_profile(pruned)
    assert small["params"] < 0.4 * full["params"] and small["macs"] < 0.4 * full["macs"]
    assert pruned.classifier.out_features == 10
    x = torch.randn(3, 3, 32, 32)
    reloaded = load_pruned(save_pruned(pruned), get_model(name, num_classes=10)).eval()
    assert torch.equal(reloaded(x), pruned(x))
    assert model_profile(reloaded) == small


def test_structured_ratio_per_layer_global_and_overrides():
    model = _model()
    per_layer = structured_prune(model, EXAMPLE, 0.25)
    assert [per_layer.features[i].out_channels for i in (0, 3, 6)] == [24, 48, 96]
    override = structured_prune(model, EXAMPLE, 0.25, layer_ratios={"features.0": 0.5})
    assert override.features[0].out_channels == 16 and override.features[3].out_channels == 48
    globally = structured_prune(model, EXAMPLE, 0.25, global_pruning=True)
    assert count_params(globally)[0] < count_params(model)[0]
    assert globally(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unstructured_pruning_is_permanent_and_exact():
    model = _model()
    sparse = unstructured_prune(model, 0.6, scope="global")
    weights = [m.weight for m in sparse.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * sum(w.numel() for w in weights))
    assert list(sparse.state_dict()) == list(model.state_dict())  # no weight_orig / weight_mask left
    assert all(not m._forward_pre_hooks for m in sparse.modules())
    per_layer = unstructured_prune(model, 0.5, scope="layer")
    for m in per_layer.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert int((m.weight == 0).sum()) == round(0.5 * m.weight.numel())
    assert count_params(model)[1] == count_params(model)[0]  # the input is untouched


def test_unstructured_finetune_keeps_the_zeros():
    model = _model()

    def finetune(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            m(torch.randn(4, 3, 32, 32)).sum().backward()
            opt.step()

    sparse = unstructured_prune(model, 0.5, finetune=finetune)
    assert count_params(sparse)[1] == count_params(unstructured_prune(model, 0.5))[1]


def test_static_quantization_is_a_quarter_of_the_size_and_close():
    model = _model()
    calibration = [torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = quantize(model, "static", calibration=calibration, example=EXAMPLE)
    assert serialized_size(q.state_dict()) < 0.3 * serialized_size(model.state_dict())
    x = calibration[0][:8]
    with quantized_engine("x86"), torch.no_grad():
        out = q(x)
    ref = model(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_dynamic_and_fp16_quantization():
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    dynamic = quantize(model, "dynamic")
    assert type(dynamic.classifier).__module__.startswith("torch.ao.nn.quantized.dynamic")
    with torch.no_grad():
        assert torch.allclose(dynamic(x), model(x), atol=0.05)
    half = quantize(model, "fp16")
    assert torch.equal(half.classifier.weight, model.classifier.weight.half().float())


def _run_view(test_size=120):
    from fl.data import build_federation
    from fl.hooks import RunView

    federation = build_federation("synthetic", num_clients=4, seed=0, samples_per_client=40, test_size=test_size)

    def build():
        return get_model("cnn_small", num_classes=10)

    def load(arrays):
        model = build()
        model.load_state_dict(arrays.to_torch_state_dict())
        return model

    return RunView(run_dir="unused", federation=federation, build_model=build, load_global=load, num_rounds=1,
                   initial_arrays=ArrayRecord(_model().state_dict()))


def test_plugin_reports_a_before_after_table_on_the_final_model():
    from fl.local_training import ClientData, evaluate

    run = _run_view()
    plugin = ModelCompression(structured_ratio=0.5, unstructured_amount=0.5, quantization="static",
                              calibration_samples=64, finetune_epochs=1, finetune_samples=64)
    final = ArrayRecord(_model(seed=1).state_dict())
    assert plugin.after_aggregate(run, 1, final) is None  # every=0: only at the end
    report = plugin.on_run_end(run)
    rows = report.text["table"].splitlines()
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["dense", "structured", "unstructured", "quantized",
                                                             "structured+quantized"]
    s = report.scalars
    model = run.load_global(final).eval()
    test = ClientData(run.federation.test, np.arange(len(run.federation.test)))
    assert s["dense/accuracy"] == evaluate(model, test)["accuracy"]  # measured on the final model
    assert s["dense/params"] == count_params(model)[0] and s["dense/macs"] == model_profile(model)["macs"]
    assert s["structured/params"] < 0.3 * s["dense/params"]
    assert s["unstructured/nonzero"] < 0.55 * s["dense/nonzero"]
    assert s["quantized/size_bytes"] < 0.3 * s["dense/size_bytes"]
    assert s["structured+quantized/size_bytes"] < s["quantized/size_bytes"]
    assert s["quantized/params"] == s["dense/params"] and s["quantized/macs"] == s["dense/macs"]


def test_plugin_options_are_checked():
    with pytest.raises(ValueError, match="quantization"):
        ModelCompression(quantization="int4")


def test_compression_plugin_in_a_run(tmp_path):
    from fl.run_logger import read_metrics
    from tests.helpers import run_inprocess

    _, run_dir = run_inprocess(tmp_path, ["plugins=[compression]", "plugins.compression.every=1",
                                          "plugins.compression.calibration_samples=32",
                                          "plugins.compression.quantization=dynamic"])
    rows = read_metrics(run_dir)
    first = rows[1]  # round 1 (every=1; the last round's table goes to on_run_end)
    p = "plugin/compression/"
    assert first[p + "structured/params"] < first[p + "dense/params"]
    assert first[p + "unstructured/nonzero"] < first[p + "dense/nonzero"]
    assert first[p + "quantized/size_bytes"] < first[p + "dense/size_bytes"]
    assert 0.0 <= first[p + "structured+quantized/accuracy"] <= 1.0


def test_plugin_draws_accuracy_against_size_and_macs_and_writes_the_table(tmp_path):
    import csv
    import io

    from PIL import Image

    from fl.run_logger import RunLogger, image_path
    from plugins.compression.plugin import CSV_FILE, TABLE_FILE, tradeoff_series
    from tests.test_figures import assert_picture

    run = _run_view(test_size=60)
    plugin = ModelCompression(quantization="dynamic", sweep=[0.25, 0.5, 0.75])
    rows = plugin.compare(run, ArrayRecord(_model(seed=1).state_dict()))
    names = [r.technique for r in rows]
    assert names == ["dense", "structured", "unstructured", "quantized", "structured+quantized", "structured 25%",
                     "unstructured 25%", "structured 75%", "unstructured 75%"]  # 50% is the main row
    series = tradeoff_series(rows)
    assert [len(series[k]) for k in ("dense", "structured", "unstructured")] == [1, 3, 3]
    assert sorted(p.label for p in series["structured"]) == ["25%", "50%", "75%"]
    structured = sorted(series["structured"], key=lambda p: p.label)
    assert structured[0].macs > structured[1].macs > structured[2].macs  # more pruned, fewer MACs
    report = plugin.report(rows)
    assert report.scalars["structured_25pct/macs"] == structured[0].macs
    logger = RunLogger(tmp_path)
    logger.log_report("compression", report, 2)
    logger.close()
    assert_picture(image_path(tmp_path, "compression", "tradeoff", 2).read_bytes())
    table_rows = list(csv.DictReader(io.StringIO((tmp_path / CSV_FILE).read_text())))
    assert [r["technique"] for r in table_rows] == names
    assert float(table_rows[0]["accuracy"]) == pytest.approx(rows[0].accuracy, abs=1e-6)
    assert (tmp_path / TABLE_FILE).read_text().splitlines()[2].startswith("| dense |")
    assert Image.open(image_path(tmp_path, "compression", "tradeoff", 2)).size[0] > 600


@pytest.mark.parametrize("key, value", [("sweep", [0.5, 1.0]), ("structured_ratio", -0.1), ("unstructured_amount", 1.0)])
def test_plugin_refuses_ratios_outside_0_1(key, value):
    with pytest.raises(ValueError, match=f"compression.{key} must be in \\[0, 1\\)"):
        ModelCompression(**{key: value})
