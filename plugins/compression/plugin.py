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

Where it runs: accuracy and fine-tuning of the float models on the run's compute device
(``RunView.device``); pruning, profiling, serialization and everything int8 on the CPU (PyTorch's
int8 kernels are CPU kernels), so the sizes, counts and MACs are the same on every device.

``sweep`` adds rows at more pruning ratios (``structured 25%``, ``unstructured 75%``, ...) so the
trade-off figure has a curve per pruning technique, not one point.

The report: a markdown table (TensorBoard text ``plugin/compression/table``), one scalar per cell
(``<technique>/accuracy``, ``/size_bytes``, ``/params``, ``/nonzero``, ``/macs``; ``structured 25%``
logs as ``structured_25pct``), the figure of accuracy against serialized size and against MACs
(``plugin/compression/tradeoff``, drawn by ``fl.figures.accuracy_tradeoff``; also a PNG under
``images/compression/`` in the run directory), and the table as files in the run directory
(``compression_table.md``, ``compression_table.csv``; the latest compression's).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fl import figures
from fl.compute import CPU, placed
from fl.hooks import Plugin, Report, RunView, register_plugin
from fl.local_training import ClientData, TrainHyper, evaluate, train_dense
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
    ratio: float | None = None  # the pruning ratio of a pruned row


@register_plugin("compression")
class ModelCompression(Plugin):
    def __init__(self, structured: bool = True, structured_ratio: float = 0.5, global_pruning: bool = False,
                 layer_ratios: Mapping[str, float] | None = None, round_to: int | None = None,
                 unstructured: bool = True, unstructured_amount: float = 0.5, unstructured_scope: str = "global",
                 quantization: str = "static", backend: str = "x86", combine: bool = True,
                 finetune_epochs: int = 0, finetune_samples: int = 1000, finetune_lr: float = 0.01,
                 batch_size: int = 32, calibration_samples: int = 256, eval_samples: int = 0, every: int = 0,
                 sweep: Sequence[float] = (), seed: int = 0):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"compression.quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        for key, value in (("structured_ratio", structured_ratio), ("unstructured_amount", unstructured_amount),
                           *(("sweep", r) for r in sweep)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"compression.{key} must be in [0, 1), got {value}")
        self.structured, self.structured_ratio = bool(structured), float(structured_ratio)
        self.global_pruning, self.layer_ratios = bool(global_pruning), dict(layer_ratios or {})
        self.round_to = None if round_to is None else int(round_to)
        self.unstructured, self.unstructured_amount = bool(unstructured), float(unstructured_amount)
        self.unstructured_scope = unstructured_scope
        self.quantization, self.backend, self.combine = quantization, backend, bool(combine)
        self.finetune = TrainHyper(epochs=int(finetune_epochs), batch_size=int(batch_size), lr=float(finetune_lr),
                                   momentum=0.0)
        self.finetune_samples, self.calibration_samples = int(finetune_samples), int(calibration_samples)
        self.eval_samples, self.every, self.seed = int(eval_samples), int(every), int(seed)
        self.sweep = sorted({float(r) for r in sweep})
        self._latest: ArrayRecord | None = None
        self._device = CPU  # the run's compute device, set by compare()

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
        """Compress the model held in ``arrays`` with every enabled technique; one row each (the
        ``sweep`` ratios last)."""
        federation = run.federation
        model = run.load_global(arrays).eval()
        test = self._test_data(run)
        profile = dict(in_channels=federation.channels, image_size=federation.image_size)
        dense_profile = model_profile(model, **profile)
        self._device = run.device
        rows = [self._row("dense", model, test, serialized_size(model.state_dict()), dense_profile["macs"])]
        pruned = None
        if self.structured:
            pruned, saved = self._structured(run, model, self.structured_ratio)
            pruned_macs = model_profile(pruned, **profile)["macs"]
            rows.append(self._row("structured", pruned, test, len(saved), pruned_macs,
                                  self._structured_note(self.structured_ratio), ratio=self.structured_ratio))
        if self.unstructured:
            sparse = self._unstructured(run, model, self.unstructured_amount)
            rows.append(self._row("unstructured", sparse, test, serialized_size(sparse.state_dict()),
                                  dense_profile["macs"], self._unstructured_note(self.unstructured_amount),
                                  ratio=self.unstructured_amount))
        if self.quantization != "none":
            rows.append(self._quantized_row("quantized", model, run, test, dense_profile["macs"]))
            if self.combine and pruned is not None:
                rows.append(self._quantized_row("structured+quantized", pruned, run, test, pruned_macs))
        for ratio in self.sweep:
            if self.structured and ratio != self.structured_ratio:
                swept, saved = self._structured(run, model, ratio)
                rows.append(self._row(f"structured {ratio:.0%}", swept, test, len(saved),
                                      model_profile(swept, **profile)["macs"], self._structured_note(ratio),
                                      ratio=ratio))
            if self.unstructured and ratio != self.unstructured_amount:
                swept = self._unstructured(run, model, ratio)
                rows.append(self._row(f"unstructured {ratio:.0%}", swept, test, serialized_size(swept.state_dict()),
                                      dense_profile["macs"], self._unstructured_note(ratio), ratio=ratio))
        return rows

    def float_models(self, run: RunView, arrays: ArrayRecord) -> dict[str, nn.Module]:
        """The compressed models that stay float (pruned at the main ratios; fp16-rounded when that
        is the quantization), by a display name: what another plugin can measure like the original
        (the geometry plugin's side-by-side views). Integer-quantized models are left out."""
        model = run.load_global(arrays).eval()
        out = {}
        if self.structured:
            out[f"structured {self.structured_ratio:.0%}"] = self._structured(run, model, self.structured_ratio)[0]
        if self.unstructured:
            out[f"unstructured {self.unstructured_amount:.0%}"] = self._unstructured(run, model,
                                                                                     self.unstructured_amount)
        if self.quantization == "fp16":
            out["fp16"] = quantize(model, "fp16")
        return out

    def runs_at(self, server_round: int, num_rounds: int) -> bool:
        """Whether this plugin compresses the global model of ``server_round`` (every k rounds, and the last)."""
        return server_round == num_rounds or (self.every > 0 and server_round % self.every == 0)

    def report(self, rows: list[Row]) -> Report:
        scalars = {}
        for row in rows:
            for field in ("accuracy", "size_bytes", "params", "nonzero", "macs"):
                scalars[f"{tag(row.technique)}/{field}"] = float(getattr(row, field))
        markdown = table(rows)
        figure = figures.accuracy_tradeoff(tradeoff_series(rows), title="compression of the global model")
        return Report(scalars=scalars, text={"table": markdown}, images={"tradeoff": figures.to_rgb(figure)},
                      files={TABLE_FILE: markdown + "\n", CSV_FILE: table_csv(rows)})

    # -- pieces ------------------------------------------------------------------------------

    def _row(self, technique: str, model: nn.Module, test: ClientData, size: int, macs: int, note: str = "",
             counts: tuple[int, int] | None = None, ratio: float | None = None, on_cpu: bool = False) -> Row:
        """A table row; the accuracy on the compute device (``on_cpu``: an int8 model, on the CPU)."""
        params, nonzero = counts or count_params(model)
        with placed(model, CPU if on_cpu else self._device):
            accuracy = evaluate(model, test)["accuracy"]
        return Row(technique, accuracy, size, params, nonzero, macs, note, ratio)

    def _structured(self, run: RunView, model: nn.Module, ratio: float) -> tuple[nn.Module, bytes]:
        """The structurally pruned model as it is saved and reloaded (``tp.state_dict``), and its bytes."""
        federation = run.federation
        example = torch.zeros(1, federation.channels, federation.image_size, federation.image_size)
        pruned = structured_prune(model, example, ratio, global_pruning=self.global_pruning,
                                  layer_ratios=self.layer_ratios, round_to=self.round_to)
        if self.finetune.epochs > 0:
            self._finetune(run, pruned)
        saved = save_pruned(pruned)
        return load_pruned(saved, run.build_model()).eval(), saved

    def _unstructured(self, run: RunView, model: nn.Module, amount: float) -> nn.Module:
        finetune = (lambda m: self._finetune(run, m)) if self.finetune.epochs > 0 else None
        return unstructured_prune(model, amount, scope=self.unstructured_scope, finetune=finetune).eval()

    def _structured_note(self, ratio: float) -> str:
        scope = "global" if self.global_pruning else "per-layer"
        return f"{ratio:.0%} of channels, {scope}, L2 filter norm" + self._ft_note()

    def _unstructured_note(self, amount: float) -> str:
        return f"{amount:.0%} of weights zeroed, {self.unstructured_scope}; dense storage" + self._ft_note()

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
                            f"{self.quantization} int8 ({self.backend})", counts, on_cpu=True)
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
        with placed(model, run.device):
            train_dense(model, data, self.finetune, torch.Generator().manual_seed(self.seed))
        model.eval()

    def _ft_note(self) -> str:
        return f", fine-tuned {self.finetune.epochs} ep" if self.finetune.epochs > 0 else ""


TABLE_FILE, CSV_FILE = "compression_table.md", "compression_table.csv"  # in the run directory


def tag(technique: str) -> str:
    """A row's name in scalar tags: ``structured 25%`` -> ``structured_25pct``."""
    return technique.replace("%", "pct").replace(" ", "_")


def tradeoff_series(rows: list[Row]) -> dict[str, list[figures.TradeoffPoint]]:
    """The figure's series: one per technique (``structured 25%`` joins ``structured``), each
    point labelled with its pruning ratio."""
    series: dict[str, list[figures.TradeoffPoint]] = {}
    for row in rows:
        name = row.technique.split(" ")[0]
        if name.endswith("quantized") and row.note:
            name = f"{name}, {row.note}"
        label = "" if row.ratio is None else f"{row.ratio:.0%}"
        series.setdefault(name, []).append(figures.TradeoffPoint(row.size_bytes, row.macs, row.accuracy, label))
    return series


def table_csv(rows: list[Row]) -> str:
    """The rows as CSV (one header line, accuracy as a share, sizes in bytes)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["technique", "ratio", "accuracy", "size_bytes", "params", "nonzero", "macs", "note"])
    for r in rows:
        writer.writerow([r.technique, "" if r.ratio is None else r.ratio, f"{r.accuracy:.6f}", r.size_bytes, r.params,
                         r.nonzero, r.macs, r.note])
    return out.getvalue()


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
