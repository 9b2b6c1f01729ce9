"""Update codecs: the client's change, compressed (top-k, int8, fp16), with error feedback.

An update codec sends what training changed, d = w_local - w_received, not the weights; the
receiver rebuilds w = reference + decoded(d) with the reference it holds (the server's global
state: ``decode(record, reference)`` is the same call as for a model codec). Error feedback
(Seide et al. 2014; Stich et al., "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy et
al., "Error Feedback Fixes SignSGD", ICML 2019) keeps what compression dropped on the client,
    c_t = d_t + r_{t-1};   sent_t = D(C(c_t));   r_t = c_t - sent_t,
so that sum_t sent_t + r_T = sum_t d_t exactly: nothing a client learned is lost, only delayed.
The residual lives in the node's persistent state (Flower's ``Context.state``), never on the
server, so the same code runs on a simulated node and on a real SuperNode.

Serialized form (one ArrayRecord, a handful of arrays whatever the model, so NumPy's 128-byte
header per array stays negligible): the floating tensors of the reference, in its order, are
flattened and handled tensor by tensor:
    "values"   the kept entries: fp32, fp16 or int8 (per-tensor scale), tensor after tensor
    "indices"  int32 position of each kept entry inside its tensor (top-k only)
    "scales"   float32 per-tensor scale max|kept| / 127 (int8 only)
    "buffers"  non-floating buffers (BatchNorm's counter) as int64 values, sent as they are
Top-k keeps k_t = min(n_t, max(1, round(ratio * n_t))) entries of largest magnitude in each
tensor (per-layer selection, as in Deep Gradient Compression, so no layer starves); the
receiver recomputes k_t from the reference shapes and checks it.

Stated error of one round trip, per tensor t with update u (before error feedback):
    fp32 values:  kept entries exact; every dropped entry |u_i| <= min kept |u_j|
    fp16 values:  kept entries within fp16 rounding (relative 2^-11, absolute 2^-24 near 0)
    int8 values:  kept entries within scale_t / 2 = max|kept u| / 254
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fl.payload.codec import BUFFERS_KEY, Codec, State, array_values, as_array, decode_buffers, register_codec


UPDATE_VALUES = ("fp32", "fp16", "int8")
RESIDUAL_KEY = "payload.residual"  # key of the error-feedback residual in a node's Context.state

_VALUES_KEY, _INDICES_KEY, _SCALES_KEY = "values", "indices", "scales"


@dataclass(frozen=True)
class UpdateCodec(Codec):
    """A codec of updates: ``encode_update(local, received, residual) -> (record, residual)``.

    ``decode(record, reference)`` returns full weights (reference + update), so strategies use
    it like any codec. ``encode(state)`` alone has no reference to subtract and raises: clients
    encode their reply with :func:`encode_reply`.
    """

    ratio: float = 1.0  # share of each tensor's entries sent (top-k); 1.0 sends every entry
    values: str = "fp32"  # how the sent entries travel: fp32, fp16 or int8 with a per-tensor scale
    error_feedback: bool = True
    encode_update: Callable[..., tuple[ArrayRecord, State]] | None = None


def topk_count(numel: int, ratio: float) -> int:
    """Entries top-k keeps in a tensor of ``numel`` entries (at least one, at most all)."""
    return numel if ratio >= 1.0 else min(numel, max(1, int(round(ratio * numel))))


def update_codec(ratio: float = 1.0, values: str = "fp32", *, error_feedback: bool = True,
                 name: str | None = None) -> UpdateCodec:
    """Build (not register) the update codec keeping ``ratio`` of each tensor as ``values``.

    Default names: ``topk_<ratio>`` plus ``+fp16``/``+int8`` for quantized values; without top-k
    ``int8``, ``update_fp16`` and ``update_fp32`` (the exact update); ``_noef`` marks a codec
    without error feedback.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
    if values not in UPDATE_VALUES:
        raise ValueError(f"update values must be one of {UPDATE_VALUES}, got {values!r}")
    if name is None:
        if ratio < 1.0:
            name = f"topk_{ratio:g}" + ("" if values == "fp32" else f"+{values}")
        else:
            name = "int8" if values == "int8" else f"update_{values}"
        name += "" if error_feedback else "_noef"

    def encode(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
        raise TypeError(f"codec {name!r} sends updates (local - received weights): it needs the received "
                        f"weights, so encode with fl.payload.encode_reply(codec, local, received, state), "
                        f"and use it as codec.up only")

    def encode_update(local: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                      residual: Mapping[str, torch.Tensor] | None = None) -> tuple[ArrayRecord, State]:
        return _encode_update(local, received, residual, ratio, values, error_feedback)

    def decode(record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
        return _apply_update(reference, _decode_update(record, reference, ratio, values))

    return UpdateCodec(name, encode, decode, ratio=ratio, values=values, error_feedback=error_feedback,
                       encode_update=encode_update)


def encode_reply(codec: Codec, local: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                 state: RecordDict | None = None) -> ArrayRecord:
    """What a client sends back: its weights through a model codec, or its update through an
    update codec with the error-feedback residual read from and written to ``state`` (the node's
    ``Context.state``; None: no memory between rounds)."""
    if not isinstance(codec, UpdateCodec):
        return codec.encode(local)
    residual = None
    if codec.error_feedback and state is not None and RESIDUAL_KEY in state:
        residual = state[RESIDUAL_KEY].to_torch_state_dict()
    record, new_residual = codec.encode_update(local, received, residual)
    if codec.error_feedback and state is not None:
        state[RESIDUAL_KEY] = ArrayRecord({k: v.contiguous() for k, v in new_residual.items()})
    return record


def example_payload(codec: Codec, reference: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A payload of ``codec`` for a model shaped like ``reference`` (names, dtypes, shapes, size):
    ``encode(reference)``, or for an update codec the encoding of a zero update."""
    if isinstance(codec, UpdateCodec):
        return codec.encode_update(reference, reference, None)[0]
    return codec.encode(reference)


def decode_update(codec: UpdateCodec, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
    """The update an update-codec record carries (floating tensors only), without the reference added."""
    return _decode_update(record, reference, codec.ratio, codec.values)


def _encode_update(local, received, residual, ratio: float, values: str,
                   error_feedback: bool) -> tuple[ArrayRecord, State]:
    if list(local.keys()) != list(received.keys()):
        raise ValueError("local and received states name different tensors")
    kept_values, kept_indices, scales, buffers = [], [], [], []
    new_residual: State = {}
    for name, ref in received.items():
        w = local[name]
        if not ref.is_floating_point():
            buffers.append(w.detach().reshape(-1).to(torch.int64))
            continue
        update = (w.detach().float() - ref.detach().float()).reshape(-1)
        if error_feedback and residual is not None and name in residual and residual[name].numel() == update.numel():
            update = update + residual[name].float().reshape(-1)
        if ratio < 1.0:  # every tensor sends indices, even one small enough to go whole
            index = torch.topk(update.abs(), topk_count(update.numel(), ratio), sorted=False).indices.sort().values
            chosen = update[index]
            kept_indices.append(index.to(torch.int32))
        else:
            index, chosen = None, update
        sent = chosen
        if values == "int8":
            q, scale = _quantize_int8(chosen)
            scales.append(scale)
            kept_values.append(q)
            sent = q.float() * scale
        elif values == "fp16":
            kept_values.append(chosen.to(torch.float16))
            sent = kept_values[-1].float()
        else:
            kept_values.append(chosen)
        if error_feedback:
            left = update.clone()
            if index is None:
                left -= sent
            else:
                left[index] -= sent
            new_residual[name] = left.reshape(ref.shape)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[values]
    arrays = {_VALUES_KEY: as_array(torch.cat(kept_values) if kept_values else torch.zeros(0, dtype=dtype))}
    if ratio < 1.0:
        arrays[_INDICES_KEY] = as_array(torch.cat(kept_indices) if kept_indices else torch.zeros(0, dtype=torch.int32))
    if values == "int8":
        arrays[_SCALES_KEY] = as_array(torch.cat(scales) if scales else torch.zeros(0))
    if buffers:
        arrays[BUFFERS_KEY] = as_array(torch.cat(buffers))
    return ArrayRecord(arrays), new_residual


def _decode_update(record: ArrayRecord, reference: Mapping[str, torch.Tensor], ratio: float, values: str) -> State:
    floats = [(name, ref) for name, ref in reference.items() if ref.is_floating_point()]
    counts = [topk_count(ref.numel(), ratio) for _, ref in floats]
    kept = array_values(record[_VALUES_KEY])
    if kept.shape != (sum(counts),):
        raise ValueError(f"update payload holds {kept.shape} values, the model needs {sum(counts)} "
                         f"(top-k ratio {ratio}): was it encoded for another model?")
    kept = torch.from_numpy(kept).float()
    indices = torch.from_numpy(array_values(record[_INDICES_KEY])).long() if ratio < 1.0 else None
    if indices is not None and indices.shape != kept.shape:
        raise ValueError(f"update payload holds {kept.numel()} values but {indices.numel()} indices")
    scales = torch.from_numpy(array_values(record[_SCALES_KEY])) if values == "int8" else None
    update: State = {}
    start = 0
    for t, ((name, ref), k) in enumerate(zip(floats, counts)):
        chunk = kept[start:start + k]
        if scales is not None:
            chunk = chunk * scales[t]
        if indices is None:
            flat = chunk
        else:
            where = indices[start:start + k]
            if k and (int(where.min()) < 0 or int(where.max()) >= ref.numel()):
                raise ValueError(f"update payload indexes outside {name!r} ({ref.numel()} entries)")
            flat = torch.zeros(ref.numel(), dtype=torch.float32)
            flat[where] = chunk
        update[name] = flat.reshape(ref.shape)
        start += k
    return update | decode_buffers(record, reference)


def _apply_update(reference: Mapping[str, torch.Tensor], update: State) -> State:
    """Full weights: reference + update for floating tensors, the sent values for the others."""
    return {name: (ref.float() + update[name]).to(ref.dtype) if ref.is_floating_point() else update[name]
            for name, ref in reference.items()}


def _quantize_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = tensor.abs().max().float() / 127.0 if tensor.numel() else torch.tensor(0.0)
    q = torch.zeros_like(tensor, dtype=torch.float32) if scale == 0 else torch.round(tensor.float() / scale)
    return q.clamp_(-127, 127).to(torch.int8), scale.reshape(1)


def _encode_int8_weights(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The weights themselves as int8 with a per-tensor scale (a model codec: fit for the downlink)."""
    arrays: dict[str, Array] = {}
    for name, t in state.items():
        if t.is_floating_point():
            q, scale = _quantize_int8(t.detach())
            arrays[name] = as_array(q)
            arrays[name + ".scale"] = as_array(scale)
        else:
            arrays[name] = as_array(t)
    return ArrayRecord(arrays)


def _decode_int8_weights(record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
    state: State = {}
    for name, ref in reference.items():
        if name not in record:
            raise ValueError(f"payload keys differ from the model: missing [{name!r}]")
        array = torch.from_numpy(array_values(record[name]))
        if tuple(array.shape) != tuple(ref.shape):
            raise ValueError(f"payload array {name!r} has shape {tuple(array.shape)}, model has {tuple(ref.shape)}")
        if ref.is_floating_point():
            array = array.float() * torch.from_numpy(array_values(record[name + ".scale"]))[0]
        state[name] = array.to(ref.dtype)
    return state


INT8_WEIGHTS = register_codec(Codec("int8_weights", _encode_int8_weights, _decode_int8_weights))
for _values in UPDATE_VALUES:  # int8, update_fp16, update_fp32, topk_<r>[+fp16|+int8]
    register_codec(update_codec(1.0, _values))
    for _ratio in (0.001, 0.01, 0.05, 0.1, 0.2, 0.5):
        register_codec(update_codec(_ratio, _values))
del _values, _ratio
