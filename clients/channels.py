"""Structured channel masks on a model, with torch-pruning's DependencyGraph.

torch-pruning (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023) finds what is
coupled to a layer's output channels: the next layer's input slice (through pooling and flatten),
BatchNorm entries, residual partners. Nothing here re-derives that coupling:

* ``ChannelMasks`` = {root layer name: bool[the dense layer's output channels]}, one entry per
  prunable group: every conv/linear layer except the classifier (coupled layers share a group,
  named by the layer torch-pruning roots it at).
* ``ChannelPruner.build(masks)`` copies the dense architecture and removes the pruned channels
  physically (``group.prune()``): the model a Hermes client trains is smaller, not masked.
* ``ChannelPruner.keep(masks)`` says which dense coordinates of every tensor survive, as the
  per-tensor channel masks the slice codec sends (``fl.payload.Keep``). It prunes a float64 copy
  in which every entry holds its own flat index ("index tagging") and reads the survivors, so the
  slices on the wire are exactly what torch-pruning removed, for any architecture it supports.
* ``ChannelPruner.next_masks(model, masks, step, target)`` is Hermes's pruning step: per group,
  ``step`` of the remaining channels with the lowest L1 filter norm ``sum_j |w_ij|`` over the root
  layer's own filter i (torch-pruning's ``MagnitudeImportance(p=1, group_reduction="first")``),
  never past ``target`` of the layer. Hermes prunes channels by the weight magnitude criterion of
  Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017, Section 3.1: the sum of absolute
  kernel weights), layer by layer, as do public re-implementations of Hermes
  (``torch.nn.utils.prune.ln_structured(n=1, dim=0)``).
"""

from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
import torch_pruning as tp
from torch import Tensor, nn

from fl.compute import model_device
from fl.payload import Keep, State, keep_coordinates, sliced_dims

ChannelMasks = dict[str, Tensor]  # root layer name -> bool[dense output channels]; False = pruned
PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


class ChannelPruner:
    """The prunable channel groups of one dense architecture, and pruning to a set of masks."""

    def __init__(self, model: nn.Module, example: Tensor, *, skip: Iterable[str] = ("classifier",)):
        self.template = copy.deepcopy(model).cpu().float()
        self.example = example.detach().cpu().float()
        self.reference: State = {k: v.detach().clone() for k, v in self.template.state_dict().items()}
        graph = self._graph(self.template, self.example)
        ignored = [self.template.get_submodule(name) for name in skip]
        names = {module: name for name, module in self.template.named_modules()}
        roots = {names[g[0].dep.target.module]
                 for g in graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE)}
        order = [name for name, _ in self.template.named_modules() if name in roots]
        self.channels: dict[str, int] = {name: graph.get_out_channels(self.template.get_submodule(name))
                                         for name in order}

    # -- masks -------------------------------------------------------------------------------

    def full_masks(self) -> ChannelMasks:
        return {name: torch.ones(n, dtype=torch.bool) for name, n in self.channels.items()}

    def masks_of(self, keep: Keep) -> ChannelMasks:
        """The group masks a per-tensor ``Keep`` implies: each root layer's kept output channels."""
        return {name: keep[f"{name}.weight"][0].clone() for name in self.channels}

    def keep(self, masks: ChannelMasks) -> Keep:
        """Per tensor, the channel masks of the coordinates that survive pruning to ``masks``."""
        tagged = copy.deepcopy(self.template).double()
        with torch.no_grad():
            for t in tagged.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape))
        self._prune(tagged, masks, self._graph(tagged, self.example.double()))
        survived = tagged.state_dict()
        out: Keep = {}
        for name, ref in self.reference.items():
            if not ref.is_floating_point():
                if survived[name].shape != ref.shape:
                    raise ValueError(f"torch-pruning changed the non-floating tensor {name!r}")
                out[name] = tuple(torch.ones(ref.shape[d], dtype=torch.bool) for d in range(sliced_dims(ref.shape)))
                continue
            flat = torch.zeros(ref.numel(), dtype=torch.bool)
            flat[survived[name].reshape(-1).long()] = True
            coords = flat.reshape(ref.shape)
            masks_t = tuple(coords.transpose(0, d).reshape(ref.shape[d], -1).any(1)
                            for d in range(sliced_dims(ref.shape)))
            expected = torch.arange(ref.numel()).reshape(ref.shape)[coords].reshape(-1)
            if not torch.equal(keep_coordinates(masks_t, ref.shape), coords) or \
                    not torch.equal(survived[name].reshape(-1).long(), expected):
                raise ValueError(f"pruning {name!r} did not keep a channel block (kernel positions pruned?)")
            out[name] = masks_t
        return out

    # -- physical pruning --------------------------------------------------------------------

    def build(self, masks: ChannelMasks) -> tuple[nn.Module, tp.DependencyGraph]:
        """A copy of the architecture without the pruned channels, and its dependency graph.

        The weights are the template's (whatever it was built with): load the received blocks.
        The graph stays valid for further pruning of the returned model (``next_masks``).
        """
        model = copy.deepcopy(self.template)
        graph = self._graph(model, self.example)
        self._prune(model, masks, graph)
        return model, graph

    def next_masks(self, model: nn.Module, masks: ChannelMasks, step: float, target: float,
                   graph: tp.DependencyGraph | None = None) -> ChannelMasks:
        """One Hermes pruning step on ``model`` (pruned to ``masks``), as new dense-index masks."""
        graph = graph or self._graph(model, self.example)
        importance = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
        out: ChannelMasks = {}
        for name, mask in masks.items():
            kept = int(mask.sum())
            amount = prune_count(mask.numel(), kept, step, target)
            out[name] = mask.clone()
            if amount == 0:
                continue
            module = model.get_submodule(name)
            group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels,
                                            list(range(kept)))
            with torch.no_grad():
                scores = importance(group)
            lowest = torch.argsort(scores.float().cpu(), stable=True)[:amount]  # the masks live on the CPU
            out[name][mask.nonzero().reshape(-1)[lowest]] = False
        return out

    # -- helpers -----------------------------------------------------------------------------

    def _prune(self, model: nn.Module, masks: ChannelMasks, graph: tp.DependencyGraph) -> None:
        for name, n in self.channels.items():
            mask = masks[name]
            if mask.numel() != n:
                raise ValueError(f"channel mask of {name!r} has {mask.numel()} entries, the layer {n} channels")
            pruned = (~mask).nonzero().reshape(-1).tolist()
            if pruned:
                module = model.get_submodule(name)
                graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, pruned).prune()

    @staticmethod
    def _graph(model: nn.Module, example: Tensor) -> tp.DependencyGraph:
        training = model.training
        model.eval()  # tracing must not move BatchNorm's running statistics
        try:
            return tp.DependencyGraph().build_dependency(model, example_inputs=example.to(model_device(model)),
                                                         verbose=False)
        finally:
            model.train(training)


def prune_count(channels: int, kept: int, step: float, target: float) -> int:
    """Channels a group prunes in one step: ``round(step * kept)`` (at least one), never past the
    target ``floor(target * channels)`` pruned, and never the last channel."""
    cap = min(math.floor(target * channels + 1e-9), channels - 1)
    room = cap - (channels - kept)
    if room <= 0:
        return 0
    return min(room, max(1, round(step * kept)))


def pruned_fraction(masks: ChannelMasks) -> float:
    """Share of all prunable channels (over every group) that are pruned."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / max(total, 1)


def can_prune(masks: ChannelMasks, step: float, target: float) -> bool:
    """Whether a pruning step would remove anything (some group below its target)."""
    return any(prune_count(m.numel(), int(m.sum()), step, target) > 0 for m in masks.values())
