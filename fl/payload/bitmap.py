"""Sparse codecs: bitmap + values (FedDST, Bibikar et al., AAAI 2022).

A sparse model travels as the values at its mask plus, when the receiver does not already hold
that mask, the mask itself as a bitmap (1 bit per coordinate of every masked tensor). Which
tensors are masked is the sender's choice (FedDST: conv/linear weights); the others travel whole.
Serialized form (one ArrayRecord of at most five arrays, whatever the model):
    "layout"   uint8, one entry per tensor of the reference, in its order:
               0 = floating, sent whole; 1 = floating, masked; 2 = not floating (a buffer)
    "values"   the masked tensors' entries at their mask, tensor after tensor, row-major:
               exactly sum_l nnz(mask_l) numbers, fp32 or fp16
    "dense"    the whole floating tensors (biases, normalization), concatenated, same dtype
    "bitmap"   np.packbits of the concatenated flattened masks (little bit order): ceil(M/8)
               bytes for M masked coordinates; absent when the receiver already holds the mask
    "buffers"  non-floating buffers (BatchNorm's counter) as int64, sent as they are
Without a bitmap the receiver decodes with the mask it holds (``decode_bitmap(..., masks=)``).
Off-mask coordinates decode as exactly 0. Round-trip error: fp32 exact; fp16 within half
precision (relative 2^-11; values below 2^-24 in magnitude become 0 but keep their mask bit).
The plain ``encode(state)`` of the registered codecs takes the mask of every floating tensor
with two or more dimensions (conv/linear weights) to be its nonzero entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from fl.payload.codec import Codec, State, array_values, as_array, npy_array, register_codec


BITMAP_VALUES = ("fp32", "fp16")
_LAYOUT_KEY, _KEPT_KEY, _DENSE_KEY, _BITMAP_KEY, _INT_KEY = "layout", "values", "dense", "bitmap", "buffers"
_WHOLE, _MASKED, _BUFFER = 0, 1, 2

Masks = dict[str, torch.Tensor]  # name -> bool tensor of the parameter's shape


def nonzero_masks(state: Mapping[str, torch.Tensor]) -> Masks:
    """The masks ``encode`` assumes: nonzero entries of floating tensors with two or more dims."""
    return {name: t != 0 for name, t in state.items() if t.is_floating_point() and t.dim() >= 2}


def encode_bitmap(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], *,
                  values: str = "fp32", with_bitmap: bool = True) -> ArrayRecord:
    """The values of ``state`` at ``masks`` (plus the bitmap of ``masks`` when ``with_bitmap``)."""
    if values not in BITMAP_VALUES:
        raise ValueError(f"bitmap codec values must be one of {BITMAP_VALUES}, got {values!r}")
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise ValueError(f"masks name tensors the state does not hold: {unknown}")
    dtype = torch.float32 if values == "fp32" else torch.float16
    layout, kept, whole, bits, buffers = [], [], [], [], []
    for name, t in state.items():
        t = t.detach().cpu()
        if name in masks:
            mask = masks[name].detach().cpu().to(torch.bool)
            if mask.shape != t.shape or not t.is_floating_point():
                raise ValueError(f"mask of {name!r} has shape {tuple(mask.shape)}, tensor {tuple(t.shape)} "
                                 f"({t.dtype}); only floating tensors take a mask")
            layout.append(_MASKED)
            kept.append(t.reshape(-1)[mask.reshape(-1)].to(dtype))
            bits.append(mask.reshape(-1))
        elif t.is_floating_point():
            layout.append(_WHOLE)
            whole.append(t.reshape(-1).to(dtype))
        else:
            layout.append(_BUFFER)
            buffers.append(t.reshape(-1).to(torch.int64))
    arrays = {_LAYOUT_KEY: npy_array(np.asarray(layout, dtype=np.uint8)),
              _KEPT_KEY: as_array(torch.cat(kept) if kept else torch.zeros(0, dtype=dtype))}
    if whole:
        arrays[_DENSE_KEY] = as_array(torch.cat(whole))
    if with_bitmap:
        flat = torch.cat(bits).numpy() if bits else np.zeros(0, dtype=bool)
        arrays[_BITMAP_KEY] = npy_array(np.packbits(flat, bitorder="little"))
    if buffers:
        arrays[_INT_KEY] = as_array(torch.cat(buffers))
    return ArrayRecord(arrays)


def has_bitmap(record: ArrayRecord) -> bool:
    return _BITMAP_KEY in record


def decode_bitmap(record: ArrayRecord, reference: Mapping[str, torch.Tensor],
                  masks: Mapping[str, torch.Tensor] | None = None) -> tuple[State, Masks]:
    """``(state, masks)`` from a bitmap record; ``masks`` is needed (only) when it has no bitmap.

    The state has the reference's names, shapes and dtypes; off-mask entries are exactly 0.
    """
    layout = array_values(record[_LAYOUT_KEY])
    if len(layout) != len(reference):
        raise ValueError(f"sparse payload describes {len(layout)} tensors, the model has {len(reference)}: "
                         f"was it encoded for another model?")
    masked = [name for name, kind in zip(reference, layout) if kind == _MASKED]
    if has_bitmap(record):
        total = sum(reference[name].numel() for name in masked)
        flat = np.unpackbits(array_values(record[_BITMAP_KEY]), count=total, bitorder="little").astype(bool)
        out_masks, start = {}, 0
        for name in masked:
            n = reference[name].numel()
            out_masks[name] = torch.from_numpy(flat[start:start + n].copy()).reshape(reference[name].shape)
            start += n
    elif masks is None or any(name not in masks for name in masked):
        raise ValueError("sparse payload carries no bitmap: decode it with the masks it was encoded under "
                         f"(needed for {masked})")
    else:
        out_masks = {name: masks[name].to(torch.bool) for name in masked}
    kept = torch.from_numpy(array_values(record[_KEPT_KEY])).float()
    nnz = sum(int(m.sum()) for m in out_masks.values())
    if kept.numel() != nnz:
        raise ValueError(f"sparse payload holds {kept.numel()} values for masks with {nnz} nonzeros")
    whole = torch.from_numpy(array_values(record[_DENSE_KEY])).float() if _DENSE_KEY in record else torch.zeros(0)
    buffers = torch.from_numpy(array_values(record[_INT_KEY])) if _INT_KEY in record else torch.zeros(0, dtype=torch.int64)
    state: State = {}
    next_kept = next_whole = next_buffer = 0
    for (name, ref), kind in zip(reference.items(), layout):
        n = ref.numel()
        if kind == _MASKED:
            mask = out_masks[name].reshape(-1)
            flat = torch.zeros(n, dtype=torch.float32)
            k = int(mask.sum())
            flat[mask] = kept[next_kept:next_kept + k]
            next_kept += k
        elif kind == _WHOLE:
            flat = whole[next_whole:next_whole + n]
            next_whole += n
        else:
            flat = buffers[next_buffer:next_buffer + n]
            next_buffer += n
        if flat.numel() != n:
            raise ValueError(f"sparse payload ran out of entries at {name!r}: was it encoded for another model?")
        state[name] = flat.reshape(ref.shape).to(ref.dtype)
    return state, out_masks


@dataclass(frozen=True)
class BitmapCodec(Codec):
    """A bitmap + values codec; ``encode_masked``/``decode_masked`` take the masks explicitly."""

    values: str = "fp32"

    def encode_masked(self, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], *,
                      with_bitmap: bool = True) -> ArrayRecord:
        return encode_bitmap(state, masks, values=self.values, with_bitmap=with_bitmap)

    def decode_masked(self, record: ArrayRecord, reference: Mapping[str, torch.Tensor],
                      masks: Mapping[str, torch.Tensor] | None = None) -> tuple[State, Masks]:
        return decode_bitmap(record, reference, masks)


def bitmap_codec(values: str = "fp32") -> BitmapCodec:
    """Build (not register) the bitmap + values codec sending ``values`` (``bitmap_<values>``)."""
    if values not in BITMAP_VALUES:
        raise ValueError(f"bitmap codec values must be one of {BITMAP_VALUES}, got {values!r}")
    return BitmapCodec(f"bitmap_{values}",
                       lambda state: encode_bitmap(state, nonzero_masks(state), values=values),
                       lambda record, reference: decode_bitmap(record, reference)[0], values=values)


BITMAP_FP32 = register_codec(bitmap_codec("fp32"))
BITMAP_FP16 = register_codec(bitmap_codec("fp16"))
