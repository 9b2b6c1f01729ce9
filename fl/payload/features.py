"""AgileNN (Huang and Gao, MobiCom 2022): lossless coding of quantized remote features and the
split-learning tensors.

Huang and Gao, MobiCom 2022, section 5: the remote features are quantized to centroid indices
(``plugins.agilenn.quantize``) and then losslessly coded before they are offloaded. The coded
stream of ``encode_indices`` is, byte for byte:
    b"AQ" | version u8 | levels-1 u8 | mode u8 | ndim u8 | shape: ndim x u32 (little endian) | body
mode 0: body = DEFLATE (zlib, level 9: LZ77 + Huffman) of one byte per index;
mode 1: body = DEFLATE of the indices bit-packed at ceil(log2 levels) bits each (LSB first);
mode 2: body = the bit-packed indices, stored.
The encoder tries the three and keeps the shortest, so a stream is never longer than the
packed indices plus a 6 + 4 * ndim byte header. Decoding is exact (tested).

Bytes per offloaded sample (inference) are ``len(encode_indices(one sample's indices))``: what
a device sends when it offloads that sample (the server holds the centroids). In split
learning a batch travels as one ArrayRecord ``{"coded": the stream as uint8, "codebook": fp32
centroids}`` (the centroids change every step) and the feature gradients come back as fp32 or
fp16 arrays (``encode_tensors``); those messages are counted like every message, by
``payload_bytes`` in the metered grid.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from fl.payload.codec import State, array_values, npy_array


_AQ_MAGIC, _AQ_VERSION = b"AQ", 1
_AQ_DEFLATE_BYTES, _AQ_DEFLATE_PACKED, _AQ_PACKED = 0, 1, 2
FEATURE_CODED, FEATURE_CODEBOOK = "coded", "codebook"


def index_bits(levels: int) -> int:
    return max(1, int(np.ceil(np.log2(levels))))


def _pack_indices(flat: np.ndarray, bits: int) -> bytes:
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def _unpack_indices(body: bytes, count: int, bits: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(body, dtype=np.uint8), count=count * bits, bitorder="little")
    planes = planes.reshape(count, bits).astype(np.uint8)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(1).astype(np.uint8)


def encode_indices(indices: np.ndarray, levels: int) -> bytes:
    """The coded stream of centroid indices (uint8, values < levels), any shape."""
    import zlib

    flat = np.ascontiguousarray(indices, dtype=np.uint8).ravel()
    if not 2 <= levels <= 256 or (flat.size and int(flat.max()) >= levels):
        raise ValueError(f"indices must lie in [0, {levels}) with 2 <= levels <= 256")
    bits = index_bits(levels)
    packed = _pack_indices(flat, bits)
    bodies = {_AQ_DEFLATE_BYTES: zlib.compress(flat.tobytes(), 9), _AQ_DEFLATE_PACKED: zlib.compress(packed, 9),
              _AQ_PACKED: packed}
    mode = min(bodies, key=lambda m: (len(bodies[m]), m))
    shape = np.asarray(indices.shape, dtype="<u4")
    header = _AQ_MAGIC + bytes([_AQ_VERSION, levels - 1, mode, len(shape)]) + shape.tobytes()
    return header + bodies[mode]


def decode_indices(stream: bytes) -> tuple[np.ndarray, int]:
    """(indices as uint8 of the encoded shape, levels) from ``encode_indices``'s stream."""
    import zlib

    if stream[:2] != _AQ_MAGIC or stream[2] != _AQ_VERSION:
        raise ValueError("not an AgileNN feature stream (bad magic or version)")
    levels, mode, ndim = stream[3] + 1, stream[4], stream[5]
    shape = tuple(int(s) for s in np.frombuffer(stream[6:6 + 4 * ndim], dtype="<u4"))
    body = stream[6 + 4 * ndim:]
    count = int(np.prod(shape)) if shape else 1
    if mode == _AQ_DEFLATE_BYTES:
        flat = np.frombuffer(zlib.decompress(body), dtype=np.uint8)
    elif mode in (_AQ_DEFLATE_PACKED, _AQ_PACKED):
        flat = _unpack_indices(zlib.decompress(body) if mode == _AQ_DEFLATE_PACKED else body, count, index_bits(levels))
    else:
        raise ValueError(f"unknown feature stream mode {mode}")
    if flat.size != count:
        raise ValueError(f"feature stream holds {flat.size} indices, its header says {count}")
    return flat.reshape(shape).copy(), levels


def coded_bytes_per_sample(indices: np.ndarray, levels: int) -> np.ndarray:
    """Length of each sample's own coded stream (first axis = samples): the offloaded bytes."""
    return np.array([len(encode_indices(sample, levels)) for sample in indices], dtype=np.int64)


def encode_features(indices: torch.Tensor, codebook: torch.Tensor) -> ArrayRecord:
    """A batch of quantized remote features for the server: the coded stream and the centroids."""
    stream = encode_indices(indices.detach().cpu().numpy(), int(codebook.numel()))
    return ArrayRecord({FEATURE_CODED: npy_array(np.frombuffer(stream, dtype=np.uint8)),
                        FEATURE_CODEBOOK: npy_array(codebook.detach().cpu().numpy().astype(np.float32))})


def decode_features(record: ArrayRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices as int64, codebook) from ``encode_features``'s record."""
    indices, levels = decode_indices(array_values(record[FEATURE_CODED], copy=False).tobytes())
    codebook = torch.from_numpy(array_values(record[FEATURE_CODEBOOK]))  # an array of its own
    if codebook.numel() != levels:
        raise ValueError(f"codebook has {codebook.numel()} centroids, the stream {levels} levels")
    return torch.from_numpy(indices).long(), codebook


def encode_tensors(tensors: Mapping[str, torch.Tensor], values: str = "fp32") -> ArrayRecord:
    """Split-learning tensors (feature gradients, local logits, labels): floating ones as fp32
    or fp16, the others as they are."""
    dtype = {"fp32": np.float32, "fp16": np.float16}[values]
    arrays = {name: t.detach().cpu().numpy() for name, t in tensors.items()}
    return ArrayRecord({name: npy_array(a.astype(dtype) if a.dtype.kind == "f" else a) for name, a in arrays.items()})


def decode_tensors(record: ArrayRecord, names: list[str] | None = None) -> State:
    out = {}
    for name in names or list(record.keys()):
        array = array_values(record[name])
        out[name] = torch.from_numpy(array.astype(np.float32) if array.dtype == np.float16 else array)
    return out
