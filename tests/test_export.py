"""``fl.export``: exported TorchScript and ONNX models compute what the PyTorch model computes."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fl.export import Normalized, export_model, main, run_exported
from fl.models import get_model

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _load_torchscript(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


@pytest.mark.parametrize("name", ["cnn_small", "resnet8"])  # plain convs; batch norm and residuals
def test_exported_outputs_equal_pytorch_on_random_input(tmp_path, name):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(1)
    model = get_model(name, num_classes=7).eval()
    meta = export_model(model, tmp_path, name=name, input_shape=(3, 32, 32), mean=MEAN, std=STD)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # a batch size not used at export
    with torch.no_grad():
        expected = model((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
        scripted = _load_torchscript(tmp_path / meta["files"]["torchscript"])(x)
    session = onnxruntime.InferenceSession(str(tmp_path / meta["files"]["onnx"]), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["logits"], {"image": x.numpy()})
    torch.testing.assert_close(scripted, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=0, atol=1e-4)
    assert expected.shape == (3, 7) and expected.abs().max() > 0
    assert meta["input"]["normalization"] == {"mean": list(MEAN), "std": list(STD)}
    assert all(d is not None and d <= 1e-4 for d in meta["max_abs_diff"].values())
    assert json.loads((tmp_path / f"{name}.json").read_text()) == meta


def test_export_without_normalization_takes_normalized_input(tmp_path):
    torch.manual_seed(2)
    model = get_model("cnn_small", num_classes=10, in_channels=1, image_size=28).eval()
    meta = export_model(model, tmp_path, name="mnist_edge", input_shape=(1, 28, 28), formats=["torchscript"])
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(run_exported(tmp_path / meta["files"]["torchscript"], x), model(x), rtol=0, atol=1e-5)
    assert meta["input"]["normalization"] is None and list(meta["files"]) == ["torchscript"]


def test_export_from_a_run_folds_the_datasets_normalization(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from omegaconf import OmegaConf

    from fl.config import build
    from fl.data import get_federation
    from fl.execute import execute
    from tests.helpers import SMALL, SMALL_SYNTHETIC, compose_config

    run_dir = tmp_path / "run"  # what `python -m fl.simulate` leaves: config.yaml and final_model.pt
    cfg = compose_config(SMALL + SMALL_SYNTHETIC + ["rounds=1"])
    server, engine, _ = build(cfg, str(run_dir))
    execute(server, engine)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert main(["--run", str(run_dir)]) == 0
    out = run_dir / "export"
    meta = json.loads((out / "cnn_small.json").read_text())
    assert set(meta["files"]) == {"torchscript", "onnx"} and "onnx" in capsys.readouterr().out
    federation = get_federation("synthetic", num_clients=6, seed=0,
                                partition={"name": "shards", "classes_per_client": 3},
                                samples_per_client=16, test_size=64, difficulty=0.5)
    assert meta["input"]["normalization"] == {"mean": list(federation.train.mean), "std": list(federation.train.std)}
    model = get_model("cnn_small", num_classes=10)
    model.load_state_dict(torch.load(run_dir / "final_model.pt"))
    reference = Normalized(model, federation.train.mean, federation.train.std).eval()
    images, _ = federation.test.get(range(4))
    pixels = federation.test.pixels(range(4)).float() / 255  # what a phone feeds: RGB in [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(reference(pixels), model.eval()(images), rtol=0, atol=1e-4)
        for fmt in ("torchscript", "onnx"):
            torch.testing.assert_close(run_exported(out / meta["files"][fmt], pixels), reference(pixels), rtol=0,
                                       atol=1e-4)


def test_fused_tier_export_needs_a_delta_run(capsys):
    assert main(["--model", "cnn_small", "--tier", "1"]) == 2
    assert "--tier: needs --run" in capsys.readouterr().err


def test_a_delta_runs_tier_and_edge_export_compute_what_the_tier_model_computes(tmp_path, capsys):
    """``--run <DELTA run> --tier k``: the fused edge+DELTA model of tier k, as the device runs it."""
    pytest.importorskip("onnxruntime")
    from omegaconf import OmegaConf

    from fl.delta.network import FusedDelta, tier_model
    from fl.export import load_run
    from tests.helpers import run_inprocess
    from tests.test_delta_strategy import TINY

    _, run_dir = run_inprocess(tmp_path / "run", ["sim=delta_100clients", "num_clients=4", "fraction_fit=0.5",
                                                  "rounds=1", f"model.cache_dir={tmp_path}/cache", *TINY])
    fused, info = load_run(run_dir)
    assert isinstance(fused, FusedDelta)
    tiers = [float(w) for w in OmegaConf.load(run_dir / "config.yaml").strategy.tiers]
    assert main(["--run", str(run_dir), "--tier", "3", "--out", str(tmp_path / "t3")]) == 0
    assert main(["--run", str(run_dir), "--edge-only", "--out", str(tmp_path / "edge")]) == 0
    meta = json.loads((tmp_path / "t3" / "delta_fused_tier3.json").read_text())
    assert meta["width"] == tiers[3] and set(meta["files"]) == {"torchscript", "onnx"}
    tier = Normalized(tier_model(fused.eval(), tiers[3]), info["mean"], info["std"]).eval()
    assert sum(p.numel() for p in tier.parameters()) < sum(p.numel() for p in fused.parameters())
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tier(pixels)
        edge = Normalized(fused.edge, info["mean"], info["std"]).eval()(pixels)
    for fmt in ("torchscript", "onnx"):
        torch.testing.assert_close(run_exported(tmp_path / "t3" / meta["files"][fmt], pixels), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(run_exported(tmp_path / "edge" / "delta_fused_edge.onnx", pixels), edge, rtol=0, atol=1e-4)
    assert main(["--run", str(run_dir), "--tier", "4"]) == 2 and "must be in [0, 3]" in capsys.readouterr().err
