"""Channel-slice codecs: whole channels plus a channel bitmap (Hermes, Li et al., MobiCom 2021).

Structured (channel) pruning keeps, in every tensor, one block: the kept output channels
(dim 0) times the kept input channels (dim 1), at every kernel position. ``Keep`` names that
block per tensor: one bool mask per sliced dimension (dims 0 and 1 of a tensor with two or
more dimensions, dim 0 of a vector, none of a scalar). The kept coordinates of a tensor are
the outer product of its masks; "channel-constant" by construction.

Serialized form (three arrays whatever the model, so NumPy's 128-byte header per array stays
negligible):
    "values"   the kept block of every floating tensor, tensor after tensor in the reference
               order, each block row-major: fp32 or fp16
    "bitmap"   uint8, ``np.packbits`` of every floating tensor's masks (dim 0, then dim 1),
               tensor after tensor in the reference order
    "buffers"  non-floating tensors (BatchNorm's counter) whole, as int64; only when present
The receiver reads the masks against its reference shapes, so it knows each block's shape.
Bytes = kept entries x itemsize + ceil(mask bits / 8) + buffers x 8 + the npy headers and keys.
For cnn_small the bitmap is 3,275 bits (410 bytes), next to 2.2 MB of dense values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from fl.payload.codec import (BUFFERS_KEY, Codec, State, array_values, as_array, decode_buffers, npy_array,
                              register_codec)


SLICE_VALUES = ("fp32", "fp16")
_SLICE_VALUES_KEY, _SLICE_BITMAP_KEY = "values", "bitmap"

Keep = dict[str, tuple[torch.Tensor, ...]]


def sliced_dims(shape: torch.Size | tuple[int, ...]) -> int:
    """How many leading dimensions of a tensor carry a channel mask: 0, 1 or 2."""
    return min(len(shape), 2)


def full_keep(reference: Mapping[str, torch.Tensor]) -> Keep:
    """Every channel of every tensor kept."""
    return {name: tuple(torch.ones(t.shape[d], dtype=torch.bool) for d in range(sliced_dims(t.shape)))
            for name, t in reference.items()}


def keep_coordinates(masks: tuple[torch.Tensor, ...], shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The dense-shaped bool mask of the coordinates a tensor's channel masks keep."""
    out = torch.ones(shape, dtype=torch.bool)
    for d, mask in enumerate(masks):
        view = [1] * len(shape)
        view[d] = -1
        out = out & mask.reshape(view)
    return out


def kept_entries(keep: Keep, reference: Mapping[str, torch.Tensor]) -> int:
    """Number of coordinates ``keep`` holds over the whole state: per tensor, the product of its
    masks' kept channels and its unmasked dimensions (``keep_coordinates`` is their outer product)."""
    return sum(math.prod(int(mask.sum()) for mask in keep[name]) * math.prod(t.shape[len(keep[name]):])
               for name, t in reference.items())


def slice_state(state: Mapping[str, torch.Tensor], keep: Keep) -> State:
    """Each tensor's kept block (the physically smaller tensor)."""
    return {name: _slice(t, keep[name]) for name, t in state.items()}


def unslice_state(blocks: Mapping[str, torch.Tensor], keep: Keep, base: Mapping[str, torch.Tensor]) -> State:
    """Dense-shaped tensors: ``base`` (copied) with each block written back where ``keep`` says."""
    out: State = {}
    for name, b in base.items():
        index = _slice_indices(keep[name])
        full = b.detach().clone()
        if index:
            full[_slice_grid(index)] = blocks[name].to(full.dtype)
        else:
            full.copy_(blocks[name])
        out[name] = full
    return out


def relative_keep(outer: Keep, inner: Keep) -> Keep:
    """``inner`` (a subset of ``outer``) expressed in the coordinates of ``outer``'s blocks."""
    out: Keep = {}
    for name, masks in inner.items():
        if any(bool((m & ~o).any()) for m, o in zip(masks, outer[name])):
            raise ValueError(f"channel masks of {name!r} grow: a kept set must be a subset of the previous one")
        out[name] = tuple(m[o] for m, o in zip(masks, outer[name]))
    return out


@dataclass(frozen=True)
class SliceCodec(Codec):
    """A channel-slice codec; ``encode_slices``/``decode_slices`` take the blocks and ``Keep`` explicitly.

    As a plain codec, ``encode(state)`` sends every channel and ``decode`` returns dense-shaped
    tensors with zeros outside the kept blocks.
    """

    values: str = "fp32"

    def encode_slices(self, blocks: Mapping[str, torch.Tensor], keep: Keep) -> ArrayRecord:
        return _encode_slices(blocks, keep, np.dtype(np.float32 if self.values == "fp32" else np.float16))

    def decode_slices(self, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> tuple[State, Keep]:
        """``(blocks, keep)``: each tensor's kept block and the channel masks it was cut with."""
        return _decode_slices(record, reference)


def slice_codec(values: str = "fp32") -> SliceCodec:
    """Build (not register) the channel-slice codec sending ``values`` (``channel_slice_<values>``)."""
    if values not in SLICE_VALUES:
        raise ValueError(f"channel-slice values must be one of {SLICE_VALUES}, got {values!r}")
    dtype = np.dtype(np.float32 if values == "fp32" else np.float16)

    def decode(record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
        blocks, keep = _decode_slices(record, reference)
        return unslice_state(blocks, keep, {name: torch.zeros_like(t) for name, t in reference.items()})

    return SliceCodec(f"channel_slice_{values}", lambda state: _encode_slices(state, full_keep(state), dtype),
                      decode, values=values)


def _slice_indices(masks: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [m.nonzero().reshape(-1) for m in masks]


def _slice_grid(index: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Advanced index selecting the outer product of per-dimension indices (leading dims)."""
    if len(index) == 1:
        return (index[0],)
    return (index[0][:, None], index[1][None, :])


def _slice(tensor: torch.Tensor, masks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if len(masks) != sliced_dims(tensor.shape) or any(m.numel() != tensor.shape[d] for d, m in enumerate(masks)):
        raise ValueError(f"channel masks of sizes {[m.numel() for m in masks]} do not fit a tensor of shape "
                         f"{tuple(tensor.shape)}")
    index = _slice_indices(masks)
    return tensor[_slice_grid(index)] if index else tensor


def _encode_slices(blocks: Mapping[str, torch.Tensor], keep: Keep, dtype: np.dtype) -> ArrayRecord:
    values, bits, buffers = [], [], []
    for name, block in blocks.items():
        masks = keep[name]
        if not block.is_floating_point():
            if not all(bool(m.all()) for m in masks):
                raise ValueError(f"non-floating tensor {name!r} is sent whole; it cannot lose channels")
            buffers.append(block.detach().reshape(-1).to(torch.int64))
            continue
        expected = tuple(int(m.sum()) for m in masks) + tuple(block.shape[len(masks):])
        if tuple(block.shape) != expected:
            raise ValueError(f"block {name!r} has shape {tuple(block.shape)}, its channel masks keep {expected}")
        values.append(block.detach().reshape(-1).to(torch.float32))
        bits.extend(m.to(torch.bool) for m in masks)
    flat_bits = torch.cat(bits).numpy() if bits else np.zeros(0, dtype=bool)
    arrays = {
        _SLICE_VALUES_KEY: npy_array((torch.cat(values) if values else torch.zeros(0)).numpy().astype(dtype)),
        _SLICE_BITMAP_KEY: npy_array(np.packbits(flat_bits, bitorder="little")),
    }
    if buffers:
        arrays[BUFFERS_KEY] = as_array(torch.cat(buffers))
    return ArrayRecord(arrays)


def _decode_slices(record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> tuple[State, Keep]:
    floats = [(name, ref) for name, ref in reference.items() if ref.is_floating_point()]
    n_bits = sum(ref.shape[d] for _, ref in floats for d in range(sliced_dims(ref.shape)))
    packed = array_values(record[_SLICE_BITMAP_KEY])
    if packed.shape != ((n_bits + 7) // 8,):
        raise ValueError(f"channel bitmap holds {packed.size} bytes, the model needs {(n_bits + 7) // 8}: "
                         f"was it encoded for another model?")
    bits = torch.from_numpy(np.unpackbits(packed, count=n_bits, bitorder="little").astype(bool))
    values = torch.from_numpy(array_values(record[_SLICE_VALUES_KEY]))
    keep: Keep = {}
    blocks: State = {}
    bit, start = 0, 0
    for name, ref in floats:
        masks = []
        for d in range(sliced_dims(ref.shape)):
            masks.append(bits[bit:bit + ref.shape[d]].clone())
            bit += ref.shape[d]
        keep[name] = tuple(masks)
        shape = tuple(int(m.sum()) for m in masks) + tuple(ref.shape[len(masks):])
        count = int(np.prod(shape, dtype=np.int64))
        if start + count > values.numel():
            raise ValueError(f"channel-slice payload ends inside {name!r}: was it encoded for another model?")
        blocks[name] = values[start:start + count].reshape(shape).to(ref.dtype)
        start += count
    if start != values.numel():
        raise ValueError(f"channel-slice payload holds {values.numel()} values, its bitmap keeps {start}")
    others = decode_buffers(record, {n: r for n, r in reference.items() if not r.is_floating_point()}) \
        if BUFFERS_KEY in record else {}
    for name, ref in reference.items():
        if not ref.is_floating_point():
            if name not in others:
                raise ValueError(f"channel-slice payload lacks the buffer {name!r}")
            blocks[name] = others[name]
            keep[name] = full_keep({name: ref})[name]
    return {name: blocks[name] for name in reference}, {name: keep[name] for name in reference}


CHANNEL_SLICE_FP32 = register_codec(slice_codec("fp32"))
CHANNEL_SLICE_FP16 = register_codec(slice_codec("fp16"))
