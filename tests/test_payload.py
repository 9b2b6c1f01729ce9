"""Codecs round-trip and their byte counts are the serialized payload."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fl.errors import ConfigError
from fl.payload import CODECS, decode_shared, get_codec, payload_bytes, shared_decode, wire_bytes


def _state():
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g),
            "bn.num_batches_tracked": torch.tensor(7), "fc.weight": torch.randn(10, 72, generator=g)}


def test_dense_fp32_round_trip_is_exact():
    state = _state()
    codec = get_codec("dense_fp32")
    out = codec.decode(codec.encode(state), state)
    for k in state:
        assert out[k].dtype == state[k].dtype
        assert torch.equal(out[k], state[k])


def test_fp16_round_trip_within_half_precision():
    state = _state()
    codec = get_codec("fp16")
    out = codec.decode(codec.encode(state), state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype
        if v.is_floating_point():
            assert torch.allclose(out[k], v, rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(out[k], v)


@pytest.mark.parametrize("name,itemsize", [("dense_fp32", 4), ("fp16", 2)])
def test_size_is_values_plus_npy_headers(name, itemsize):
    state = _state()
    record = get_codec(name).encode(state)
    values = sum(v.numel() * (itemsize if v.is_floating_point() else v.element_size()) for v in state.values())
    # Each Array holds one .npy buffer: the raw values plus NumPy's 128-byte header.
    assert record.count_bytes() == values + 128 * len(state) + sum(len(k) for k in state)
    assert payload_bytes(RecordDict({"arrays": record})) == record.count_bytes() + len("arrays")


def test_fp16_payload_is_about_half():
    state = {"w": torch.randn(1000, 100)}
    dense = payload_bytes(RecordDict({"arrays": get_codec("dense_fp32").encode(state)}))
    half = payload_bytes(RecordDict({"arrays": get_codec("fp16").encode(state)}))
    assert abs(half / dense - 0.5) < 0.01


def test_payload_bytes_counts_every_record():
    content = RecordDict({"arrays": get_codec("dense_fp32").encode(_state()),
                          "config": ConfigRecord({"lr": 0.1, "server-round": 3}),
                          "metrics": MetricRecord({"num-examples": 50})})
    expected = sum(len(k) + r.count_bytes() for k, r in content.items())
    assert payload_bytes(content) == expected
    assert payload_bytes(content) > content["arrays"].count_bytes()


def test_payload_bytes_close_to_flower_wire_size():
    """Flower's object store adds per-object headers; for a real model that is well under 0.5%."""
    from fl.models import get_model

    model = get_model("cnn_small", num_classes=10)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict())})
    counted, wire = payload_bytes(content), wire_bytes(content)
    assert counted < wire < counted * 1.005


def test_decode_rejects_wrong_shape_and_keys():
    state = _state()
    record = get_codec("dense_fp32").encode(state)
    bad = dict(state)
    bad["fc.weight"] = torch.zeros(10, 71)
    with pytest.raises(ValueError, match="shape"):
        get_codec("dense_fp32").decode(record, bad)
    with pytest.raises(ValueError, match="missing"):
        get_codec("dense_fp32").decode(record, {**state, "extra": torch.zeros(1)})


def test_decode_shared_decodes_one_record_once():
    state = _state()
    codec = get_codec("dense_fp32")
    record = codec.encode(state)
    first = decode_shared(codec, record, state)
    assert decode_shared(codec, record, state) is first
    other = codec.encode(state)
    assert decode_shared(codec, other, state) is not first


def test_decode_shared_copies_a_record_to_a_device_once(monkeypatch):
    """The round's weights cross to an accelerator once per record, not once per client ("meta"
    stands in for a GPU here: a device that is not the CPU); the CPU copy stays the payload's."""
    state = _state()
    codec = get_codec("dense_fp32")
    record = codec.encode(state)
    cpu = decode_shared(codec, record, state)
    moves = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moves.append(a) or real_to(self, *a, **k))
    on_device = decode_shared(codec, record, state, torch.device("meta"))
    assert all(t.device.type == "meta" for t in on_device.values()) and len(moves) == len(state)
    assert decode_shared(codec, record, state, torch.device("meta")) is on_device and len(moves) == len(state)
    assert decode_shared(codec, record, state, torch.device("cpu")) is cpu
    assert all(t.device.type == "cpu" for t in cpu.values())


def test_shared_decode_decodes_once_per_record_and_tag_even_when_asked_at_once():
    """Two clients asking at the same moment get one decode; another tag (a FedDST mask version)
    is decoded apart; a tuple of mappings crosses to a device once, as a tuple."""
    import threading

    state = _state()
    record = get_codec("dense_fp32").encode(state)
    decodes, gate = [], threading.Event()

    def decode():
        decodes.append(1)
        gate.wait(5)
        return dict(state), {"mask": torch.ones(3, dtype=torch.bool)}

    results = []
    threads = [threading.Thread(target=lambda: results.append(shared_decode(record, ("v", 1), decode)))
               for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(decodes) == 1 and all(r is results[0] for r in results)
    assert shared_decode(record, ("v", 2), decode) is not results[0] and len(decodes) == 2
    on_device = shared_decode(record, ("v", 1), decode, torch.device("meta"))
    assert isinstance(on_device, tuple) and on_device[1]["mask"].device.type == "meta"
    assert shared_decode(record, ("v", 1), decode, torch.device("meta")) is on_device and len(decodes) == 2


def test_unknown_codec_lists_allowed():
    with pytest.raises(ConfigError, match="dense_fp32"):
        get_codec("zstd")
    assert {"dense_fp32", "fp16"} <= set(CODECS.names())


# -- what codec.down / codec.up mean (fl.payload.family) ------------------------------------------

@pytest.mark.parametrize("family, fp32, fp16", [("dense", "dense_fp32", "fp16"), ("bitmap", "bitmap_fp32", "bitmap_fp16"),
                                                ("slice", "channel_slice_fp32", "channel_slice_fp16")])
def test_a_precision_name_means_that_precision_in_every_family(family, fp32, fp16):
    from fl.payload import family_of, resolve_codec

    for key in ("codec.down", "codec.up"):
        assert resolve_codec("dense_fp32", family, key).name == fp32
        assert resolve_codec("fp16", family, key).name == fp16
        assert family_of(resolve_codec(fp16, family, key)) == family  # a family's own name is itself


@pytest.mark.parametrize("name, family, key, fragment", [
    ("topk_0.1", "dense", "codec.down", "codec.up only"),
    ("topk_0.1", "slice", "codec.up", "sends slice payloads"),
    ("channel_slice_fp16", "bitmap", "codec.up", "sends bitmap payloads"),
    ("bitmap_fp32", "dense", "codec.down", "sends dense payloads"),
    ("nope", "dense", "codec.up", "unknown codec"),
])
def test_a_codec_the_family_cannot_send_is_one_config_error_naming_the_key(name, family, key, fragment):
    from fl.payload import resolve_codec

    with pytest.raises(ConfigError, match=fragment) as refused:
        resolve_codec(name, family, key)
    assert refused.value.key == key
    assert "allowed:" in str(refused.value) or "such as" in str(refused.value)


def test_every_strategy_declares_its_family_and_resolves_both_codecs_there():
    from strategies import STRATEGIES

    expected = {"fedavg": "dense", "agilenn": "dense", "feddst": "bitmap", "hermes": "slice", "delta": "slice"}
    assert {name: STRATEGIES.get(name).payload_family for name in expected} == expected


# -- npy_array: Array(ndarray) without re-building each .npy header ---------------------------------------------

SAVED = [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.array(3.5, dtype=np.float64), np.zeros((0, 5), dtype=np.int64), np.array([True, False, True]),
    np.arange(6, dtype=np.float16), np.arange(4, dtype=">i4"), np.arange(10.0)[::3], np.zeros((2,) * 12, np.uint8),
]


@pytest.mark.parametrize("values", SAVED, ids=["f32-3d", "fortran", "0-d", "empty", "bool", "f16", "big-endian",
                                               "strided", "12-d"])
def test_npy_array_writes_flowers_bytes(values):
    from flwr.app import Array

    from fl.payload import npy_array

    ours, flowers = npy_array(values), Array(values)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype, flowers.data)
    assert np.array_equal(ours.numpy(), values)


# -- array_values: Array.numpy() without re-parsing each .npy header ------------------------------------------

@pytest.mark.parametrize("values", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.array(3.5, dtype=np.float64), np.zeros((0, 5), dtype=np.int64), np.array([True, False, True]),
    np.arange(6, dtype=np.float16), np.arange(4, dtype=">i4"),
], ids=["f32-3d", "fortran", "0-d", "empty", "bool", "f16", "big-endian"])
def test_array_values_equal_flowers_own_decoding(values):
    from flwr.app import Array

    from fl.payload import array_values

    array = Array(values)
    got, expected = array_values(array), array.numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected)
    assert got.flags.writeable and not np.shares_memory(got, np.frombuffer(array.data, dtype=np.uint8))


def test_array_values_of_truncated_bytes_fail_as_flowers_do():
    from flwr.app import Array

    from fl.payload import array_values

    array = Array(np.arange(100, dtype=np.float32))
    short = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-8])
    with pytest.raises(Exception) as ours:
        array_values(short)
    with pytest.raises(Exception) as flowers:
        short.numpy()
    assert type(ours.value) is type(flowers.value)


def test_array_values_without_copy_is_a_view_of_the_bytes_with_the_same_layout():
    from flwr.app import Array

    from fl.payload import array_values

    array = Array(np.asfortranarray(np.arange(12.0).reshape(3, 4)))
    view = array_values(array, copy=False)
    assert np.array_equal(view, array.numpy()) and view.shape == (3, 4) and not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(array.data, dtype=np.uint8))
