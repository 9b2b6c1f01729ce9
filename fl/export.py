"""``python -m fl.export``: the edge model to TorchScript and ONNX for on-device inference.

    python -m fl.export --run runs/2026-01-01_12-00-00_fedavg           # a run's final global model
    python -m fl.export --model cnn_small --num-classes 10 --out exports  # an untrained one (shapes)

writes into ``--out`` (default: ``<run>/export``, else ``export``):

| file | contents |
|---|---|
| ``<model>.torchscript.pt`` | TorchScript (traced and frozen): ``torch.jit.load`` on Android/iOS PyTorch or any Python |
| ``<model>.onnx`` | ONNX (``torch.onnx`` with ``torch.export``), input ``image``, output ``logits``, dynamic batch |
| ``<model>.json`` | input shape and range, normalization, class count, source, versions, and the verification below |

With ``--run`` the dataset's per-channel normalization is folded into the exported graph, so a
phone feeds float32 RGB pixels in [0, 1], ``[N, C, H, W]``, and gets logits. After writing,
each file is loaded back (TorchScript by torch, ONNX by onnxruntime when it is installed) and
its outputs on random input compared with the PyTorch model; the largest difference is recorded
and an export that disagrees beyond ``--atol`` fails.

The exported model is the run's model. For a DELTA run (``model=delta``) that is the fused
edge+DELTA model at full width; ``--tier k`` exports tier k of the run's ``strategy.tiers`` instead
(``fl.delta.network.tier_model``: the width-w prefix blocks of the DELTA with E and the base's
classifier), the model a device of that tier runs, and ``--edge-only`` exports E alone (a device
that runs no DELTA):

    python -m fl.export --run runs/<delta run> --tier 3          # the narrowest of the four tiers
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from fl.errors import ConfigError

FORMATS = ("torchscript", "onnx")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_ATOL = 1e-4


class Normalized(nn.Module):
    """``model((x - mean) / std)``: the training-time normalization as part of the graph."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def export_model(model: nn.Module, out: str | Path, *, name: str, input_shape: tuple[int, int, int],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 formats: Sequence[str] = FORMATS, atol: float = DEFAULT_ATOL,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (eval mode, normalization folded in when given) in ``formats``; returns the
    metadata also written to ``<out>/<name>.json``."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError("formats", f"unknown {unknown}; allowed: {', '.join(FORMATS)}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    module = (Normalized(model, mean, std) if mean is not None else model).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, *input_shape, generator=generator)
    check = torch.rand(5, *input_shape, generator=generator)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        expected = module(check)
    meta: dict[str, Any] = {
        "model": name,
        "input": {"name": INPUT_NAME, "shape": ["batch", *input_shape], "dtype": "float32",
                  "range": [0.0, 1.0] if mean is not None else "normalized as in training",
                  "normalization": None if mean is None else {"mean": list(mean), "std": list(std)}},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", int(expected.shape[1])], "meaning": "class logits"},
        "torch": torch.__version__,
        "files": {},
        "max_abs_diff": {},
        **(extra or {}),
    }
    writers = {"torchscript": _torchscript, "onnx": _onnx}
    for fmt in formats:
        path = folder / f"{name}.{'torchscript.pt' if fmt == 'torchscript' else 'onnx'}"
        writers[fmt](module, example, path)
        meta["files"][fmt] = path.name
        got = run_exported(path, check)
        if got is None:
            meta["max_abs_diff"][fmt] = None  # onnxruntime not installed: not verified
            continue
        diff = float((got - expected).abs().max())
        meta["max_abs_diff"][fmt] = diff
        if not diff <= atol:
            raise RuntimeError(f"{path}: exported outputs differ from PyTorch's by {diff:.3g} (> {atol})")
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def run_exported(path: str | Path, x: torch.Tensor) -> torch.Tensor | None:
    """Outputs of an exported file on ``x``: TorchScript by torch, ONNX by onnxruntime (None if absent)."""
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still supported
        loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return loaded(x)


def _torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.freeze(torch.jit.trace(module, example))
        traced.save(str(path))


def _onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ConfigError("formats", "ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from None
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes=({0: batch},), dynamo=True, verbose=False, optimize=True)


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A run's final global model and what the export needs about it (shape, normalization)."""
    from omegaconf import OmegaConf

    from fl.config import build

    folder = Path(run_dir)
    for needed in ("config.yaml", "final_model.pt"):
        if not (folder / needed).is_file():
            raise ConfigError("--run", f"{folder} has no {needed} (a finished run directory has both)")
    cfg = OmegaConf.load(folder / "config.yaml")
    cfg.compute = "cpu"  # tracing and checking run on the CPU: a run trained on a GPU exports on any machine
    if "compute" in (cfg.get("model") or {}):
        cfg.model.compute = "cpu"
    spec, _, _ = build(cfg, str(folder))
    federation = spec.client.data.federation()
    model = spec.client.model.build_for(federation)
    model.load_state_dict(torch.load(folder / "final_model.pt", map_location="cpu"))
    return model, {"name": spec.client.model.name,
                   "input_shape": (federation.channels, federation.image_size, federation.image_size),
                   "mean": federation.train.mean, "std": federation.train.std,
                   "extra": {"num_classes": federation.num_classes, "dataset": federation.name,
                             "source": str(folder.resolve() / "final_model.pt")}}


def delta_part(model: nn.Module, info: dict[str, Any], run_dir: str | Path, tier: int | None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Tier ``tier`` of a DELTA run's fused model (``None``: its edge model E alone)."""
    from omegaconf import OmegaConf

    from fl.delta.network import FusedDelta, tier_model

    if not isinstance(model, FusedDelta):
        raise ConfigError("--tier", f"{run_dir} is not a DELTA run (its model is {info['name']}); export it without "
                                    "--tier/--edge-only")
    if tier is None:
        return model.edge, {**info, "name": f"{info['name']}_edge", "extra": {**info["extra"], "part": "edge"}}
    tiers = [float(w) for w in OmegaConf.load(Path(run_dir) / "config.yaml").strategy.tiers]
    if not 0 <= tier < len(tiers):
        raise ConfigError("--tier", f"must be in [0, {len(tiers) - 1}] (the run's tiers: {tiers}), got {tier}")
    width = tiers[tier]
    return tier_model(model.eval(), width), {**info, "name": f"{info['name']}_tier{tier}",
                                             "extra": {**info["extra"], "tier": tier, "width": width}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl.export", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a finished run directory (config.yaml + final_model.pt)")
    source.add_argument("--model", help="a zoo model name (fl.models.list_models()), freshly initialized")
    parser.add_argument("--weights", help="with --model: a state_dict file to load (e.g. a run's final_model.pt)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", help="output folder (default: <run>/export, else ./export)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="largest accepted output difference")
    parser.add_argument("--tier", type=int, help="with --run of a DELTA run: the fused edge+DELTA model of this "
                                                  "tier (index into the run's strategy.tiers)")
    parser.add_argument("--edge-only", action="store_true", help="with --run of a DELTA run: the edge model E alone")
    args = parser.parse_args(argv)
    try:
        if (args.tier is not None or args.edge_only) and not args.run:
            raise ConfigError("--tier" if args.tier is not None else "--edge-only", "needs --run <a DELTA run directory>")
        if args.run:
            model, info = load_run(args.run)
            if args.tier is not None or args.edge_only:
                model, info = delta_part(model, info, args.run, args.tier)
            out = args.out or str(Path(args.run) / "export")
        else:
            from fl.models import get_model

            torch.manual_seed(0)
            model = get_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels,
                              image_size=args.image_size)
            if args.weights:
                model.load_state_dict(torch.load(args.weights, map_location="cpu"))
            info = {"name": args.model, "input_shape": (args.in_channels, args.image_size, args.image_size),
                    "mean": None, "std": None,
                    "extra": {"num_classes": args.num_classes, "source": args.weights or "random initialization"}}
            out = args.out or "export"
        meta = export_model(model, out, name=info["name"], input_shape=info["input_shape"], mean=info["mean"],
                            std=info["std"], formats=args.formats, atol=args.atol, extra=info["extra"])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for fmt, file in meta["files"].items():
        diff = meta["max_abs_diff"][fmt]
        checked = "not verified (pip install onnxruntime)" if diff is None else f"max |diff| vs PyTorch {diff:.2e}"
        print(f"{fmt}: {Path(out) / file} ({checked})")
    print(f"metadata: {Path(out) / (info['name'] + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
