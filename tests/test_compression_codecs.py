"""Update codecs (top-k, int8, fp16 values, error feedback): round trip within the stated error,
bytes equal to the serialized payload, and the error-feedback invariant (fl/payload/update.py)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from fl.payload import (CODECS, RESIDUAL_KEY, UpdateCodec, decode_update, encode_reply, get_codec, payload_bytes,
                        topk_count, update_codec)

UPDATE_CODECS = [name for name in CODECS.names() if isinstance(get_codec(name), UpdateCodec)]


def _global():
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(16, 3, 3, 3, generator=g), "conv.bias": torch.randn(16, generator=g),
            "bn.num_batches_tracked": torch.tensor(7), "fc.weight": torch.randn(10, 200, generator=g),
            "fc.bias": torch.randn(10, generator=g), "scale": torch.randn(1, generator=g)}


def _local(reference, seed=1, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    out = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3
           for k, v in reference.items()}
    return out


def test_registry_has_the_named_update_codecs():
    assert {"int8", "topk_0.01", "topk_0.1", "topk_0.01+int8", "topk_0.1+fp16", "update_fp32"} <= set(UPDATE_CODECS)
    assert "int8_weights" in CODECS


@pytest.mark.parametrize("name", UPDATE_CODECS)
def test_update_round_trip_within_stated_error(name):
    codec = get_codec(name)
    received = _global()
    local = _local(received)
    record, _ = codec.encode_update(local, received, None)
    decoded = codec.decode(record, received)
    assert list(decoded) == list(received)
    assert torch.equal(decoded["bn.num_batches_tracked"], local["bn.num_batches_tracked"])
    for key, ref in received.items():
        if not ref.is_floating_point():
            continue
        assert decoded[key].dtype == ref.dtype and decoded[key].shape == ref.shape
        true = (local[key] - ref).reshape(-1)
        got = (decoded[key] - ref).reshape(-1)
        k = topk_count(true.numel(), codec.ratio)
        kept = torch.topk(true.abs(), k).indices
        dropped = torch.ones_like(true, dtype=torch.bool)
        dropped[kept] = False
        # dropped entries arrive as exactly the reference value (update 0) and are the smallest
        assert torch.all(got[dropped] == 0)
        if dropped.any():
            assert true[dropped].abs().max() <= true[kept].abs().min()
        error = (got[kept] - true[kept]).abs()
        bound = {"fp32": 1e-6, "fp16": 2.0 ** -11 * true[kept].abs() + 1e-6,
                 "int8": true[kept].abs().max() / 254 + 1e-6}[codec.values]
        assert torch.all(error <= bound), name


def test_topk_keeps_the_largest_entries_exactly():
    received = {"w": torch.zeros(1000)}
    local = {"w": torch.arange(1000, dtype=torch.float32) - 500}  # |u| largest at both ends
    codec = get_codec("topk_0.01")
    record, _ = codec.encode_update(local, received)
    decoded = codec.decode(record, received)["w"]
    kept = torch.nonzero(decoded).reshape(-1).tolist()
    assert kept == [0, 1, 2, 3, 4, 995, 996, 997, 998, 999]  # 10 = 1% of 1000, |u| in 495..500
    assert torch.equal(decoded[kept], local["w"][kept])


def _serialized_bytes(state, codec):
    """The bytes the codec's arrays take, written out from NumPy's .npy layout (128-byte header)."""
    floats = [v for v in state.values() if v.is_floating_point()]
    kept = sum(topk_count(v.numel(), codec.ratio) for v in floats)
    itemsize = {"fp32": 4, "fp16": 2, "int8": 1}[codec.values]
    arrays = {"values": kept * itemsize, "buffers": 8 * sum(v.numel() for v in state.values() if not v.is_floating_point())}
    if codec.ratio < 1:
        arrays["indices"] = 4 * kept
    if codec.values == "int8":
        arrays["scales"] = 4 * len(floats)
    return sum(len(key) + 128 + size for key, size in arrays.items())


@pytest.mark.parametrize("name", UPDATE_CODECS)
def test_update_bytes_are_the_serialized_payload(name):
    codec = get_codec(name)
    received = _global()
    record, _ = codec.encode_update(_local(received), received)
    assert record.count_bytes() == _serialized_bytes(received, codec)
    content = RecordDict({"arrays": record})
    assert payload_bytes(content) == record.count_bytes() + len("arrays")


def test_top1_percent_int8_is_under_two_percent_of_dense_on_cnn_small():
    from fl.models import get_model

    torch.manual_seed(0)
    received = get_model("cnn_small", num_classes=10).state_dict()
    local = _local(received)
    dense = payload_bytes(RecordDict({"arrays": get_codec("dense_fp32").encode(local)}))
    sparse = payload_bytes(RecordDict({"arrays": encode_reply(get_codec("topk_0.01+int8"), local, received)}))
    assert sparse <= 0.02 * dense
    assert sparse == pytest.approx(0.0125 * dense, rel=0.1)  # 1% of entries at 1 + 4 bytes each


@pytest.mark.parametrize("name", ["topk_0.01", "topk_0.1+int8", "topk_0.01+fp16", "int8"])
def test_error_feedback_keeps_what_was_not_sent(name):
    """sum_t sent_t + r_T == sum_t (local_t - received_t) over rounds with a moving global model."""
    codec = get_codec(name)
    node_state = RecordDict()
    received = _global()
    true_sum = {k: torch.zeros_like(v) for k, v in received.items() if v.is_floating_point()}
    sent_sum = {k: torch.zeros_like(v) for k in true_sum for v in [received[k]]}
    for t in range(6):
        local = _local(received, seed=10 + t, scale=0.05)
        record = encode_reply(codec, local, received, node_state)
        sent = decode_update(codec, record, received)
        for k in true_sum:
            true_sum[k] += local[k] - received[k]
            sent_sum[k] += sent[k]
        received = _local(received, seed=100 + t)  # the server moved on
    residual = node_state[RESIDUAL_KEY].to_torch_state_dict()
    for k in true_sum:
        assert torch.allclose(sent_sum[k] + residual[k], true_sum[k], atol=1e-5), k
        if topk_count(residual[k].numel(), codec.ratio) < residual[k].numel():
            assert residual[k].abs().sum() > 0, k  # something was held back


def test_error_feedback_sends_the_residual_later():
    """A coordinate too small to be sent grows in the residual until it is sent."""
    codec = get_codec("topk_0.5")
    received = {"w": torch.zeros(2)}
    node_state = RecordDict()
    sends = []
    for _ in range(3):
        record = encode_reply(codec, {"w": torch.tensor([1.0, 0.6])}, received, node_state)
        sends.append(decode_update(codec, record, received)["w"].tolist())
    # c_1 = [1, .6] sends 1; c_2 = [1, 1.2] sends the grown 1.2; c_3 = [2, .6] sends the waiting 2
    assert np.allclose(sends, [[1.0, 0.0], [0.0, 1.2], [2.0, 0.0]])


def test_without_error_feedback_nothing_is_kept():
    codec = update_codec(0.01, "int8", error_feedback=False)
    assert codec.name == "topk_0.01+int8_noef"
    node_state = RecordDict()
    received = _global()
    encode_reply(codec, _local(received), received, node_state)
    assert RESIDUAL_KEY not in node_state


def test_model_codecs_pass_through_encode_reply():
    received = _global()
    local = _local(received)
    record = encode_reply(get_codec("dense_fp32"), local, received, RecordDict())
    assert torch.equal(torch.from_numpy(record["fc.weight"].numpy()), local["fc.weight"])


def test_update_codec_refuses_to_encode_without_the_received_weights():
    with pytest.raises(TypeError, match="encode_reply"):
        get_codec("topk_0.01").encode(_global())


def test_decode_rejects_a_payload_for_another_model():
    codec = get_codec("topk_0.1+int8")
    received = _global()
    record, _ = codec.encode_update(_local(received), received)
    other = {**received, "fc.weight": torch.zeros(10, 100)}
    with pytest.raises(ValueError, match="another model"):
        codec.decode(record, other)


def test_int8_weights_round_trip_within_half_a_step():
    codec = get_codec("int8_weights")
    state = _global()
    out = codec.decode(codec.encode(state), state)
    for k, v in state.items():
        if v.is_floating_point():
            assert torch.all((out[k] - v).abs() <= v.abs().max() / 254 + 1e-7)
        else:
            assert torch.equal(out[k], v)


def test_residual_of_another_shape_is_dropped():
    codec = get_codec("topk_0.1")
    received = {"w": torch.zeros(100)}
    node_state = RecordDict({RESIDUAL_KEY: ArrayRecord({"w": torch.ones(7)})})
    record = encode_reply(codec, {"w": torch.full((100,), 0.5)}, received, node_state)
    sent = decode_update(codec, record, received)["w"]
    assert np.isclose(sent.abs().max().item(), 0.5)


def test_fedavg_with_top1_percent_int8_uploads_at_most_two_percent_of_dense(tmp_path):
    """End to end: clients encode their update (clients/app.py via encode_reply), the server
    decodes it against the global model before averaging, the meter counts what was sent."""
    from fl.run_logger import read_metrics
    from tests.helpers import run_inprocess

    dense, dense_dir = run_inprocess(tmp_path / "dense", ["rounds=1"])
    sparse, sparse_dir = run_inprocess(tmp_path / "sparse", ["rounds=1", "codec.up=topk_0.01+int8"])
    assert sparse["cum_up_bytes"] <= 0.02 * dense["cum_up_bytes"]
    # the broadcast stays dense: only the codec's name in the config differs
    assert sparse["cum_down_bytes"] == pytest.approx(dense["cum_down_bytes"], abs=100)
    dense_rows, sparse_rows = read_metrics(dense_dir), read_metrics(sparse_dir)
    assert [r["clients"] for r in sparse_rows] == [r["clients"] for r in dense_rows]
    assert all(r["failures"] == 0 for r in sparse_rows)
    final = torch.load(sparse_dir / "final_model.pt")
    from fl.models import get_model

    torch.manual_seed(0)
    initial = get_model("cnn_small", num_classes=10).state_dict()
    changed = sum(int((final[k] != initial[k]).sum()) for k in initial if initial[k].is_floating_point())
    total = sum(v.numel() for v in initial.values() if v.is_floating_point())
    assert 0 < changed <= 0.03 * total  # 3 clients x 1 round of top-1% updates moved at most 3%


@pytest.mark.parametrize("name", ["topk_0.01+int8", "int8", "dense_fp32"])
def test_example_payload_has_the_layout_of_a_real_one(name):
    from fl.payload import example_payload

    codec = get_codec(name)
    received = _global()
    example = example_payload(codec, received)
    real = encode_reply(codec, _local(received), received)
    assert {k: (a.dtype, a.shape) for k, a in example.items()} == {k: (a.dtype, a.shape) for k, a in real.items()}
    assert example.count_bytes() == real.count_bytes()


def test_decode_rejects_indices_outside_the_tensor():
    codec = get_codec("topk_0.1")
    received = {"w": torch.zeros(100)}
    record, _ = codec.encode_update({"w": torch.ones(100)}, received)
    record["indices"] = ArrayRecord({"i": torch.full((10,), 100, dtype=torch.int32)})["i"]
    with pytest.raises(ValueError, match="outside"):
        codec.decode(record, received)
