"""Payload codecs and byte accounting: the one home for how models travel and what that costs.

Every message's payload is counted from what is actually serialized, the
Flower ``Message`` content, never from a formula beside it. Flower serializes an ``ArrayRecord``
as one NumPy ``.npy`` buffer per array (``Array.data``); ``ArrayRecord.count_bytes()`` is the
length of those buffers plus the keys, and ``ConfigRecord``/``MetricRecord.count_bytes()`` the
size of their values and keys. ``payload_bytes`` sums these over the whole ``RecordDict``.

Flower's object store adds a header per object (type, child ids, length) when the content is
pushed over gRPC; ``wire_bytes`` computes that exact figure with Flower's own ``deflate``. It costs
a SHA-256 over every buffer (about 10 ms per 2.5 MB on this machine's CPU, measured), so the
simulator logs ``payload_bytes`` and a test bounds the difference (under 0.5% for the shipped
models).

Codecs turn a ``{name: tensor}`` state into an ``ArrayRecord`` and back. The receiver needs the
reference state (names, shapes, dtypes) to decode; it always has one (its own model).

    accounting.py  payload_bytes, wire_bytes
    codec.py       Codec, the registry (get_codec), the dense codecs dense_fp32 and fp16
    shared.py      decode_shared, shared_decode: a broadcast decoded once per round
    update.py      update codecs (top-k, int8, fp16 updates, error feedback), int8_weights
    bitmap.py      sparse values + bitmap codecs (FedDST)
    slices.py      channel-slice codecs (Hermes, DELTA's tiers)
    features.py    AgileNN's coded feature stream and split-learning tensors
    family.py      what codec.down / codec.up mean for a strategy's payload family (resolve_codec)
"""

from fl.payload.accounting import payload_bytes, wire_bytes
from fl.payload.bitmap import (BITMAP_VALUES, BitmapCodec, Masks, bitmap_codec, decode_bitmap, encode_bitmap, has_bitmap,
                               nonzero_masks)
from fl.payload.codec import CODECS, Codec, State, array_values, get_codec, npy_array, register_codec
from fl.payload.family import FAMILIES, family_of, resolve_codec
from fl.payload.features import (FEATURE_CODED, coded_bytes_per_sample, decode_features, decode_indices, decode_tensors,
                                 encode_features, encode_indices, encode_tensors, index_bits)
from fl.payload.shared import decode_shared, shared_decode
from fl.payload.slices import (SLICE_VALUES, Keep, SliceCodec, full_keep, keep_coordinates, kept_entries, relative_keep,
                               slice_codec, slice_state, sliced_dims, unslice_state)
from fl.payload.update import (RESIDUAL_KEY, UPDATE_VALUES, UpdateCodec, decode_update, encode_reply, example_payload,
                               topk_count, update_codec)

__all__ = [
    "BITMAP_VALUES", "CODECS", "FAMILIES", "FEATURE_CODED", "RESIDUAL_KEY", "SLICE_VALUES", "UPDATE_VALUES",
    "BitmapCodec", "Codec", "Keep", "Masks", "SliceCodec", "State", "UpdateCodec",
    "array_values", "bitmap_codec", "coded_bytes_per_sample", "decode_bitmap", "decode_features", "decode_indices", "decode_shared",
    "decode_tensors", "decode_update", "encode_bitmap", "encode_features", "encode_indices", "encode_reply",
    "encode_tensors", "example_payload", "family_of", "full_keep", "get_codec", "has_bitmap", "index_bits", "keep_coordinates",
    "kept_entries", "nonzero_masks", "npy_array", "payload_bytes", "register_codec", "relative_keep", "resolve_codec", "shared_decode", "slice_codec", "slice_state",
    "sliced_dims", "topk_count", "unslice_state", "update_codec", "wire_bytes",
]
