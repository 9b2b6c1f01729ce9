"""What ``codec.down`` and ``codec.up`` mean, the same for every strategy, checked here only.

A strategy declares the payload family it sends (``FederatedStrategy.payload_family``):

    dense   whole tensors (FedAvg, AgileNN): weight codecs, and update codecs for ``codec.up``
    bitmap  the values at a mask plus the mask as a bitmap (FedDST): ``bitmap_fp32/fp16``
    slice   the kept channels plus a channel bitmap (Hermes, DELTA): ``channel_slice_fp32/fp16``

``dense_fp32`` and ``fp16`` name a value precision, so they mean float32 or float16 values in
whatever family the strategy sends (``codec.up=fp16`` is ``bitmap_fp16`` for FedDST and
``channel_slice_fp16`` for Hermes). Any other name is one codec of one family; a strategy of
another family refuses it with one line (``ConfigError``) when it is built, before any work.
An update codec (top-k, int8 updates) encodes what a client changed and is for ``codec.up`` only.
"""

from __future__ import annotations

from fl.errors import ConfigError
from fl.payload.bitmap import BitmapCodec
from fl.payload.codec import CODECS, Codec, get_codec
from fl.payload.slices import SliceCodec
from fl.payload.update import UpdateCodec

FAMILIES = ("dense", "bitmap", "slice")
PRECISIONS = {"dense_fp32": "fp32", "fp16": "fp16"}  # the names that carry only a value precision
_IN_FAMILY = {("dense", "fp32"): "dense_fp32", ("dense", "fp16"): "fp16",
              ("bitmap", "fp32"): "bitmap_fp32", ("bitmap", "fp16"): "bitmap_fp16",
              ("slice", "fp32"): "channel_slice_fp32", ("slice", "fp16"): "channel_slice_fp16"}


def family_of(codec: Codec) -> str:
    if isinstance(codec, BitmapCodec):
        return "bitmap"
    if isinstance(codec, SliceCodec):
        return "slice"
    return "dense"


def resolve_codec(name: str, family: str, key: str) -> Codec:
    """The codec ``name`` (the value of config key ``key``: ``codec.down`` or ``codec.up``) means
    for a strategy that sends ``family`` payloads."""
    if family not in FAMILIES:
        raise ValueError(f"payload family must be one of {FAMILIES}, got {family!r}")
    if name not in CODECS:
        raise ConfigError(key, f"unknown codec {name!r}; allowed: {', '.join(allowed(family, key))}")
    if name in PRECISIONS:
        return get_codec(_IN_FAMILY[(family, PRECISIONS[name])])
    codec = get_codec(name)
    if key == "codec.down" and isinstance(codec, UpdateCodec):
        raise ConfigError(key, f"{name!r} encodes client updates and is for codec.up only; "
                               f"use a weight codec such as {', '.join(allowed(family, key)[:3])}")
    if family_of(codec) != family:
        raise ConfigError(key, f"this strategy sends {family} payloads and cannot send {name!r} "
                               f"({family_of(codec)}); allowed: {', '.join(allowed(family, key))}")
    return codec


def allowed(family: str, key: str) -> list[str]:
    """The names ``key`` may take for a strategy of ``family``: the precisions, then that family's codecs."""
    names = [n for n in CODECS.names() if n not in PRECISIONS and family_of(get_codec(n)) == family
             and not (key == "codec.down" and isinstance(get_codec(n), UpdateCodec))]
    return [*PRECISIONS, *names]
