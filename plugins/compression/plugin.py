"""``compression``: what the global model becomes on an edge device, measured before and after.

At the end of the run (``on_run_end``, on the final global model; also every ``every`` rounds
when set) the plugin compresses a copy of the global model with each enabled technique
(``plugins.compression.techniques``) and measures, for the original and every compressed copy,
the columns of Francy & Singh's ConvNeXt/CIFAR-10 study ("Edge AI: Evaluation of Model
Compression Techniques for Convolutional Neural Networks", 2024): accuracy on the central test
set, serialized size, parameters (and non-zeros), MACs, each with its change against the
original. The rows:

    dense                  the global model as trained
    structured             channels removed (torch-pruning, per-filter L2), then saved with
                           ``tp.state_dict`` and reloaded with ``tp.load_state_dict``: the row
                           measures the reloaded model and the saved bytes
    unstructured           magnitude-pruned weights made permanent (``torch.nn.utils.prune``)
    quantized              post-training quantization (static int8 by default)
    structured+quantized   the reloaded pruned model, quantized

Quantization changes how many bits a parameter takes, not how many there are, nor how many
multiply-accumulates run: its rows repeat the float model's parameter and MAC counts (a
parameter counter reports ~0 for packed int8 weights, which is not a 95% reduction). MACs count
every weight, zero or not (dense kernels do not skip zeros).

Fine-tuning after pruning (``finetune_epochs > 0``) and static-quantization calibration use a
seeded sample of the simulated federation's training images: a simulation convenience; on a
real deployment the same functions would run where data is.

The report: a markdown table (TensorBoard text ``plugin/compression/table``) and one scalar per
cell (``<technique>/accuracy``, ``/size_bytes``, ``/params``, ``/nonzero``, ``/macs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from clients.dense import ClientData, TrainHyper, evaluate, train_dense
from fl.hooks import Plugin, Report, RunView, register_plugin
from fl.models import model_profile
from plugins.compression.techniques import (QUANTIZATIONS, count_params, fp16_state, load_pruned, quantize,
                                            quantized_engine, save_pruned, serialized_size, structured_prune,
                                            unstructured_prune)

_FINETUNE_TAG, _CALIBRATION_TAG, _EVAL_TAG = 0xF1, 0xCA, 0xE7  # seed words of the image samples


@dataclass(frozen=True)
class Row:
    technique: str
    accuracy: float
    size_bytes: int
    params: int
    nonzero: int
    macs: int
    note: str = ""


@register_plugin("compression")
class ModelCompression(Plugin):
    def __init__(self, structured: bool = True, structured_ratio: float = 0.5, global_pruning: bool = False,
                 layer_ratios: Mapping[str, float] | None = None, round_to: int | None = None,
                 unstructured: bool = True, unstructured_amount: float = 0.5, unstructured_scope: str = "global",
                 quantization: str = "static", backend: str = "x86", combine: bool = True,
                 finetune_epochs: int = 0, finetune_samples: int = 1000, finetune_lr: float = 0.01,
                 batch_size: int = 32, calibration_samples: int = 256, eval_samples: int = 0, every: int = 0,
                 seed: int = 0):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"compression.quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        self.structured, self.structured_ratio = bool(structured), float(structured_ratio)
        self.global_pruning, self.layer_ratios = bool(global_pruning), dict(layer_ratios or {})
        self.round_to = None if round_to is None else int(round_to)
        self.unstructured, self.unstructured_amount = bool(unstructured), float(unstructured_amount)
        self.unstructured_scope = unstructured_scope
        self.quantization, self.backend, self.combine = quantization, backend, bool(combine)
        self.finetune = TrainHyper(epochs=int(finetune_epochs), batch_size=int(batch_size), lr=float(finetune_lr))
        self.finetune_samples, self.calibration_samples = int(finetune_samples), int(calibration_samples)
        self.eval_samples, self.every, self.seed = int(eval_samples), int(every), int(seed)
        self._latest: ArrayRecord | None = None

    # -- hooks -------------------------------------------------------------------------------

    def after_aggregate(self, run: RunView, server_round: int, arrays: ArrayRecord) -> Report | None:
        self._latest = arrays
        if self.every > 0 and server_round % self.every == 0 and server_round != run.num_rounds:
            return self.report(self.compare(run, arrays))
        return None

    def on_run_end(self, run: RunView) -> Report | None:
        return self.report(self.compare(run, run.initial_arrays if self._latest is None else self._latest))

    # -- the comparison ----------------------------------------------------------------------

    def compare(self, run: RunView, arrays: ArrayRecord) -> list[Row]:
        """Compress the model held in ``arrays`` with every enabled technique; one row each."""
        federation = run.federation
        model = run.load_global(arrays).eval()
        example = torch.zeros(1, federation.channels, federation.image_size, federation.image_size)
        test = self._test_data(run)
        profile = dict(in_channels=federation.channels, image_size=federation.image_size)
        dense_profile = model_profile(model, **profile)
        rows = [self._row("dense", model, test, serialized_size(model.state_dict()), dense_profile["macs"])]
        pruned = None
        if self.structured:
            pruned = structured_prune(model, example, self.structured_ratio, global_pruning=self.global_pruning,
                                      layer_ratios=self.layer_ratios, round_to=self.round_to)
            if self.finetune.epochs > 0:
                self._finetune(run, pruned)
            saved = save_pruned(pruned)
            pruned = load_pruned(saved, run.build_model()).eval()
            scope = "global" if self.global_pruning else "per-layer"
            pruned_macs = model_profile(pruned, **profile)["macs"]
            rows.append(self._row("structured", pruned, test, len(saved), pruned_macs,
                                  f"{self.structured_ratio:.0%} of channels, {scope}, L2 filter norm"
                                  + self._ft_note()))
        if self.unstructured:
            finetune = (lambda m: self._finetune(run, m)) if self.finetune.epochs > 0 else None
            sparse = unstructured_prune(model, self.unstructured_amount, scope=self.unstructured_scope,
                                        finetune=finetune).eval()
            rows.append(self._row("unstructured", sparse, test, serialized_size(sparse.state_dict()),
                                  dense_profile["macs"], f"{self.unstructured_amount:.0%} of weights zeroed, "
                                  f"{self.unstructured_scope}; dense storage" + self._ft_note()))
        if self.quantization != "none":
            rows.append(self._quantized_row("quantized", model, run, test, dense_profile["macs"]))
            if self.combine and pruned is not None:
                rows.append(self._quantized_row("structured+quantized", pruned, run, test, pruned_macs))
        return rows

    def report(self, rows: list[Row]) -> Report:
        scalars = {}
        for row in rows:
            for field in ("accuracy", "size_bytes", "params", "nonzero", "macs"):
                scalars[f"{row.technique}/{field}"] = float(getattr(row, field))
        return Report(scalars=scalars, text={"table": table(rows)})

    # -- pieces ------------------------------------------------------------------------------

    def _row(self, technique: str, model: nn.Module, test: ClientData, size: int, macs: int, note: str = "",
             counts: tuple[int, int] | None = None) -> Row:
        params, nonzero = counts or count_params(model)
        return Row(technique, evaluate(model, test)["accuracy"], size, params, nonzero, macs, note)

    def _quantized_row(self, technique: str, model: nn.Module, run: RunView, test: ClientData, macs: int) -> Row:
        counts = count_params(model)  # quantization keeps every parameter (see the module docstring)
        if self.quantization == "fp16":
            rounded = quantize(model, "fp16")
            return self._row(technique, rounded, test, serialized_size(fp16_state(model)), macs,
                             "fp16 storage", counts)
        example = torch.zeros(1, run.federation.channels, run.federation.image_size, run.federation.image_size)
        quantized = quantize(model, self.quantization, calibration=self._calibration(run), example=example,
                             backend=self.backend)
        with quantized_engine(self.backend):
            row = self._row(technique, quantized, test, serialized_size(quantized.state_dict()), macs,
                            f"{self.quantization} int8 ({self.backend})", counts)
        return row

    def _test_data(self, run: RunView) -> ClientData:
        n = len(run.federation.test)
        if 0 < self.eval_samples < n:
            rng = np.random.default_rng([self.seed, _EVAL_TAG])
            return ClientData(run.federation.test, np.sort(rng.choice(n, self.eval_samples, replace=False)))
        return ClientData(run.federation.test, np.arange(n))

    def _train_sample(self, run: RunView, count: int, tag: int) -> ClientData:
        n = len(run.federation.train)
        rng = np.random.default_rng([self.seed, tag])
        return ClientData(run.federation.train, np.sort(rng.choice(n, min(count, n), replace=False)))

    def _calibration(self, run: RunView):
        data = self._train_sample(run, self.calibration_samples, _CALIBRATION_TAG)
        return (x for x, _ in data.batches(64, None))

    def _finetune(self, run: RunView, model: nn.Module) -> None:
        data = self._train_sample(run, self.finetune_samples, _FINETUNE_TAG)
        train_dense(model, data, self.finetune, torch.Generator().manual_seed(self.seed))
        model.eval()

    def _ft_note(self) -> str:
        return f", fine-tuned {self.finetune.epochs} ep" if self.finetune.epochs > 0 else ""


def table(rows: list[Row]) -> str:
    """Markdown table; changes are against the first row (the original model)."""
    base = rows[0]

    def change(value: float, reference: float) -> str:
        return "-" if reference == 0 else f"{100.0 * (value - reference) / reference:+.1f}%"

    lines = ["| technique | accuracy % | Δ acc (pp) | size KiB | Δ size | params | Δ params | non-zero | "
             "MACs | Δ MACs | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.technique} | {100 * r.accuracy:.2f} | {100 * (r.accuracy - base.accuracy):+.2f} | "
                     f"{r.size_bytes / 1024:.1f} | {change(r.size_bytes, base.size_bytes)} | {r.params:,} | "
                     f"{change(r.params, base.params)} | {r.nonzero:,} | {r.macs:,} | {change(r.macs, base.macs)} | "
                     f"{r.note} |")
    return "\n".join(lines)
