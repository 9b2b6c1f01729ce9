"""Model compression for edge clients: structured pruning, unstructured pruning, post-training
quantization. Each function takes a float model and returns a new one (the input is untouched).

Structured pruning (torch-pruning, Fang et al., "DepGraph: Towards Any Structural Pruning",
CVPR 2023): ``MagnitudePruner`` builds the model's ``DependencyGraph``, so removing a conv filter
also removes the matching BatchNorm channel and the next layer's input channel (and keeps
residual additions consistent). Importance is the classic per-filter L2 norm (Li et al.,
"Pruning Filters for Efficient ConvNets", ICLR 2017, with p = 2): ``MagnitudeImportance(p=2,
group_reduction="first")`` scores a group by the pruned layer's own filters. ``ratio`` is the
share of channels removed, either in every layer (per-layer) or, with ``global_pruning``, by one
threshold over the whole network; ``layer_ratios`` overrides it for named modules. The
classifier's outputs (the classes) are never pruned. A pruned model no longer matches its
builder's shapes: it is saved with ``tp.state_dict`` (weights plus the pruned attributes) and
rebuilt with ``tp.load_state_dict`` on a fresh unpruned instance.

Unstructured pruning (``torch.nn.utils.prune``): L1 magnitude over all conv and linear weights,
one global threshold or the same amount per layer, then ``prune.remove`` makes the zeros
permanent (plain tensors, no masks or hooks left). The dense tensors keep their size: only the
number of non-zeros falls.

Post-training quantization (CPU, ``torch.ao.quantization``):
    static   int8 weights and activations for every conv and linear layer, FX graph mode with
             the backend's default qconfig, observers calibrated on training images
    dynamic  int8 weights of the linear layers, activations quantized on the fly (convs stay fp32)
    fp16     every floating tensor stored as float16 (evaluated after casting back to float32)
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.utils.prune as prune
import torch_pruning as tp
from torch import Tensor, nn

QUANTIZATIONS = ("static", "dynamic", "fp16", "none")


# -- structured --------------------------------------------------------------------------------

def structured_prune(model: nn.Module, example: Tensor, ratio: float, *, global_pruning: bool = False,
                     layer_ratios: Mapping[str, float] | None = None, round_to: int | None = None,
                     keep: Iterable[str] = ("classifier",)) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of its channels removed (per-filter L2 importance)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"structured pruning ratio must be in [0, 1), got {ratio}")
    pruned = copy.deepcopy(model).eval()
    ignored = [pruned.get_submodule(name) for name in keep]
    ratio_dict = {pruned.get_submodule(name): float(r) for name, r in (layer_ratios or {}).items()}
    pruner = tp.pruner.MagnitudePruner(
        pruned, example, importance=tp.importance.MagnitudeImportance(p=2, group_reduction="first"),
        pruning_ratio=ratio, pruning_ratio_dict=ratio_dict or None, global_pruning=global_pruning,
        ignored_layers=ignored, round_to=round_to)
    pruner.step()
    return pruned


def save_pruned(model: nn.Module) -> bytes:
    """The pruned model as torch-pruning saves it (``tp.state_dict``: weights + pruned shapes)."""
    buffer = io.BytesIO()
    torch.save(tp.state_dict(model), buffer)
    return buffer.getvalue()


def load_pruned(data: bytes, fresh: nn.Module) -> nn.Module:
    """Rebuild a pruned model from :func:`save_pruned` bytes on a fresh unpruned instance."""
    state = torch.load(io.BytesIO(data), weights_only=False)
    tp.load_state_dict(fresh, state_dict=state)
    return fresh


# -- unstructured ------------------------------------------------------------------------------

def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]


def unstructured_prune(model: nn.Module, amount: float, *, scope: str = "global",
                       finetune: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A copy of ``model`` with ``amount`` of its conv/linear weights zeroed by magnitude, for good.

    ``finetune`` (optional) trains the copy while the masks are attached, so zeros stay zero.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"unstructured pruning amount must be in [0, 1), got {amount}")
    if scope not in ("global", "layer"):
        raise ValueError(f"unstructured scope must be 'global' or 'layer', got {scope!r}")
    pruned = copy.deepcopy(model)
    targets = prunable_weights(pruned)
    orders = {module: list(module._parameters) for module, _ in targets}
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in targets:
            prune.l1_unstructured(module, name, amount=amount)
    if finetune is not None:
        finetune(pruned)
    for module, name in targets:
        prune.remove(module, name)
        for key in orders[module]:  # pruning re-registers the weight last: restore the state-dict order
            module._parameters[key] = module._parameters.pop(key)
    return pruned


# -- quantization ------------------------------------------------------------------------------

@contextlib.contextmanager
def quantized_engine(backend: str) -> Iterator[None]:
    """Run with ``backend`` as torch's quantized engine, restoring the previous one after."""
    before = torch.backends.quantized.engine
    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantization backend {backend!r} is not available; this torch has "
                         f"{torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def quantize(model: nn.Module, kind: str, *, calibration: Iterable[Tensor] = (), example: Tensor | None = None,
             backend: str = "x86") -> nn.Module:
    """A post-training-quantized copy of ``model`` (see the module docstring for the kinds).

    ``static`` needs ``example`` (one input batch, for FX tracing) and ``calibration`` batches.
    Run the result inside ``quantized_engine(backend)``.
    """
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {kind!r}")
    source = copy.deepcopy(model).eval()
    if kind == "none":
        return source
    if kind == "fp16":
        return _fp16_rounded(source)
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings(), quantized_engine(backend), torch.no_grad():
        # torch.ao.quantization is deprecated in favour of torchao (not installed); still works.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        if kind == "dynamic":
            return quantize_dynamic(source, {nn.Linear}, dtype=torch.qint8)
        if example is None:
            raise ValueError("static quantization needs an example input for FX tracing")
        prepared = prepare_fx(source, get_default_qconfig_mapping(backend), (example,))
        seen = 0
        for batch in calibration:
            prepared(batch)
            seen += len(batch)
        if seen == 0:
            raise ValueError("static quantization needs calibration batches")
        return convert_fx(prepared)


def fp16_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _fp16_rounded(model: nn.Module) -> nn.Module:
    """The float model with every floating tensor rounded through float16 (what an fp16 file holds)."""
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in fp16_state(model).items()})
    return model


# -- sizes -------------------------------------------------------------------------------------

def serialized_size(state: Mapping[str, object] | bytes) -> int:
    """Bytes of ``torch.save(state)`` (or of already serialized bytes)."""
    if isinstance(state, bytes):
        return len(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a float model."""
    params = [p.detach() for p in model.parameters()]
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)
