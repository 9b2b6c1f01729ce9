"""Hermes-like (strategies/hermes.py, clients/hermes_trainer.py, clients/channels.py) and the
channel-slice codec, by observation: masks that are channel-constant, coupled across layers and
only shrink; no pruning below the accuracy threshold; never past the target; each client's
download is exactly its own kept coordinates; ``count`` versus ``all`` on a hand-computed
example; bytes that are the kept values plus the bitmap as serialized; one quick run."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients.channels import ChannelPruner, prune_count, pruned_fraction
from clients.hermes_trainer import (KEPT_ENTRIES, LOCAL_ACCURACY, PRUNED_NOW, HermesSettings,
                                    channel_pruner, hermes, hermes_evaluate)
from clients.trainer import TRAINER, ClientEnv, evaluator_for, run_trainer
from fl.errors import ConfigError
from fl.local_training import ClientData
from fl.message_keys import ARRAYS, CODEC, CONFIG, EPOCHS, LR, METRICS, NUM_EXAMPLES, UP_CODEC
from fl.models import get_model
from fl.node_directory import NodeDirectory
from fl.payload import full_keep, get_codec, keep_coordinates, kept_entries, payload_bytes, slice_state
from fl.run_logger import read_metrics
from fl.specs import ClientSpec, DataSpec, ModelSpec, freeze
from strategies.hermes import Hermes
from tests.helpers import run_inprocess

NPY_HEADER = 128  # bytes NumPy's .npy header takes for each 1-D array Flower serializes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_cnn():
    torch.manual_seed(0)
    return get_model("cnn_small", num_classes=10, width=0.25, hidden=24)  # convs 8/16/32, fc 512 -> 24


def _random_keep(state, generator, share=0.6):
    """Channel masks on every sliced dim (at least one channel kept) - a codec test, not a model."""
    keep = {}
    for name, t in state.items():
        masks = []
        for d in range(min(t.dim(), 2)):
            m = torch.rand(t.shape[d], generator=generator) < share
            m[0] = True
            masks.append(m)
        keep[name] = tuple(masks) if t.is_floating_point() else full_keep({name: t})[name]
    return keep


def _codec_state():
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g),
            "bn.weight": torch.randn(8, generator=g), "bn.num_batches_tracked": torch.tensor(7),
            "fc.weight": torch.randn(10, 72, generator=g), "scale": torch.tensor(0.5)}


# -- codec -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,tolerance", [("fp32", 0.0), ("fp16", 1e-3)])
def test_slice_codec_round_trip(values, tolerance):
    state = _codec_state()
    keep = _random_keep(state, torch.Generator().manual_seed(1))
    codec = get_codec(f"channel_slice_{values}")
    blocks, got_keep = codec.decode_slices(codec.encode_slices(slice_state(state, keep), keep), state)
    for name, t in state.items():
        assert all(torch.equal(a, b) for a, b in zip(got_keep[name], keep[name]))
        want = slice_state(state, keep)[name]
        assert blocks[name].shape == want.shape and blocks[name].dtype == t.dtype
        assert torch.allclose(blocks[name].float(), want.float(), rtol=tolerance, atol=tolerance)
    # as a plain codec: every channel, dense-shaped
    dense = codec.decode(codec.encode(state), state)
    assert all(torch.allclose(dense[k].float(), state[k].float(), rtol=tolerance, atol=tolerance) for k in state)


@pytest.mark.parametrize("values,itemsize", [("fp32", 4), ("fp16", 2)])
def test_slice_codec_bytes_are_kept_values_plus_bitmap(values, itemsize):
    state = _codec_state()
    keep = _random_keep(state, torch.Generator().manual_seed(2))
    record = get_codec(f"channel_slice_{values}").encode_slices(slice_state(state, keep), keep)
    kept = sum(math.prod(int(m.sum()) for m in keep[n]) * math.prod(t.shape[len(keep[n]):])
               for n, t in state.items() if t.is_floating_point())
    bits = sum(t.shape[d] for t in state.values() if t.is_floating_point() for d in range(min(t.dim(), 2)))
    buffers = 1  # bn.num_batches_tracked, whole, as int64
    expected = (len("values") + NPY_HEADER + itemsize * kept + len("bitmap") + NPY_HEADER + math.ceil(bits / 8)
                + len("buffers") + NPY_HEADER + 8 * buffers)
    assert record.count_bytes() == expected
    assert payload_bytes(RecordDict({"arrays": record})) == expected + len("arrays")


def test_slice_codec_rejects_another_models_payload():
    state = _codec_state()
    codec = get_codec("channel_slice_fp32")
    record = codec.encode(state)
    for rows in (12, 40):  # same bitmap length in bytes (values disagree), longer bitmap
        other = dict(state, **{"fc.weight": torch.zeros(rows, 72)})
        with pytest.raises(ValueError, match="another model"):
            codec.decode_slices(record, other)


# -- channel masks on a model ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn_small", "resnet8"])
def test_pruned_model_is_the_masked_dense_model(name):
    """The physically smaller model computes what the dense model computes with the pruned
    coordinates zeroed, and its tensors are exactly the kept blocks the codec cuts."""
    torch.manual_seed(0)
    dense = get_model(name, num_classes=10, width=0.25)
    dense.eval()
    pruner = ChannelPruner(dense, torch.zeros(1, 3, 32, 32))
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in dense.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    masks = pruner.next_masks(pruner.build(pruner.full_masks())[0], pruner.full_masks(), 0.4, 0.5)
    keep = pruner.keep(masks)
    pruner.template.load_state_dict(dense.state_dict())
    small, _ = pruner.build(masks)
    small.eval()
    blocks = slice_state(dense.state_dict(), keep)
    assert all(torch.equal(small.state_dict()[k], blocks[k]) for k in blocks)
    masked = get_model(name, num_classes=10, width=0.25)
    masked.load_state_dict({k: v * keep_coordinates(keep[k], v.shape) if v.is_floating_point() else v
                            for k, v in dense.state_dict().items()})
    masked.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(small(x), masked(x), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in dense.parameters())


def test_a_pruning_step_removes_the_lowest_l1_filter_norms_computed_by_hand():
    """Hermes's criterion (Li et al., ICLR 2017): per layer, the channels whose filters have the
    smallest sum of absolute weights go. Heavy-tailed weights make the L2 ranking differ, so the
    test tells the two criteria apart."""
    model = _tiny_cnn()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) ** 3)
    pruner = ChannelPruner(model, torch.zeros(1, 3, 32, 32))
    full = pruner.full_masks()
    step, target = 0.25, 0.5
    masks = pruner.next_masks(model, full, step, target)
    differs = 0
    for name, mask in masks.items():
        filters = model.get_submodule(name).weight.detach().flatten(1)
        amount = prune_count(mask.numel(), mask.numel(), step, target)
        l1 = [sum(abs(float(w)) for w in row) for row in filters]  # by hand, row by row
        expected = set(sorted(range(len(l1)), key=lambda i: (l1[i], i))[:amount])
        assert set((~mask).nonzero().reshape(-1).tolist()) == expected, name
        l2 = filters.norm(dim=1)
        differs += set(torch.argsort(l2, stable=True)[:amount].tolist()) != expected
    assert set(masks) == {"features.0", "features.3", "features.6", "fc"}
    assert differs >= 1  # the L2 filter norm would have pruned other channels here


def test_prune_count_never_passes_the_target():
    for channels in range(2, 70):
        for target in (0.0, 0.3, 0.5, 0.9):
            kept, steps = channels, 0
            while (amount := prune_count(channels, kept, 0.2, target)) > 0:
                kept -= amount
                steps += 1
                assert channels - kept <= math.floor(target * channels + 1e-9) and kept >= 1
            assert steps < 100


# -- the client: a Hermes round, repeated ----------------------------------------------------------

def _client_env(partition=0, server_round=1):
    spec = ClientSpec(data=DataSpec("synthetic", num_clients=4, seed=0,
                                    options=freeze({"samples_per_client": 24, "test_size": 32})),
                      model=ModelSpec("cnn_small", freeze({"width": 0.25, "hidden": 24})), seed=0)
    federation = spec.data.federation()
    return ClientEnv(spec=spec, federation=federation,
                     data=ClientData(federation.train, federation.client_indices[partition]), partition_id=partition,
                     server_round=server_round, state=RecordDict(),
                     generator=torch.Generator().manual_seed(100 + server_round))


def _train_config(threshold, step=0.2, target=0.5, val_fraction=0.3):
    return ConfigRecord({TRAINER: "hermes", CODEC: "channel_slice_fp32", UP_CODEC: "channel_slice_fp32",
                         LR: 0.05, EPOCHS: 1,
                         **HermesSettings(threshold, step, target, val_fraction).to_config()})


def _cnn_coupling_holds(keep, side):
    """Whole channels: conv i's kept filters = its bias = conv i+1's kept inputs; fc's inputs are
    conv 3's channels times the pooled positions; the classifier keeps every class."""
    convs = ["features.0", "features.3", "features.6"]
    for a, b in zip(convs, convs[1:]):
        assert torch.equal(keep[f"{a}.weight"][0], keep[f"{a}.bias"][0])
        assert torch.equal(keep[f"{a}.weight"][0], keep[f"{b}.weight"][1])
    assert torch.equal(keep["features.6.weight"][0].repeat_interleave(side * side), keep["fc.weight"][1])
    assert torch.equal(keep["fc.weight"][0], keep["classifier.weight"][1])
    assert bool(keep["classifier.weight"][0].all()) and bool(keep["classifier.bias"][0].all())
    assert bool(keep["features.0.weight"][1].all())  # the image's channels


def test_client_masks_channel_constant_monotone_and_capped_at_target():
    env = _client_env()
    pruner = channel_pruner(env)
    codec = get_codec("channel_slice_fp32")
    keep = full_keep(pruner.reference)
    record = codec.encode_slices(dict(pruner.reference), keep)
    fractions = []
    for server_round in range(1, 6):
        env.server_round = server_round
        record, metrics = run_trainer(hermes, record, _train_config(threshold=0.0, target=0.5), env)
        _, new_keep = codec.decode_slices(record, pruner.reference)
        _cnn_coupling_holds(new_keep, side=4)
        for name, ref in pruner.reference.items():  # monotone: the kept coordinates only shrink
            old, new = keep_coordinates(keep[name], ref.shape), keep_coordinates(new_keep[name], ref.shape)
            assert not bool((new & ~old).any())
        masks = pruner.masks_of(new_keep)
        assert all(int((~m).sum()) <= math.floor(0.5 * m.numel()) for m in masks.values())
        assert metrics[KEPT_ENTRIES] == kept_entries(new_keep, pruner.reference)
        fractions.append(pruned_fraction(masks))
        keep = new_keep
    assert fractions == sorted(fractions) and fractions[0] > 0
    assert fractions[-1] == fractions[-2] <= 0.5  # reached the target and stopped


def test_no_pruning_below_the_accuracy_threshold():
    env = _client_env(partition=1)
    pruner = channel_pruner(env)
    codec = get_codec("channel_slice_fp32")
    record = codec.encode(pruner.reference)
    _, probe = run_trainer(hermes, record, _train_config(threshold=0.0, val_fraction=0.5), env)
    accuracy = probe[LOCAL_ACCURACY]
    assert accuracy < 1.0
    env.generator.manual_seed(101)  # the same round again, same batches
    below, metrics = run_trainer(hermes, record, _train_config(threshold=accuracy + 1e-6, val_fraction=0.5), env)
    assert metrics[LOCAL_ACCURACY] == accuracy and metrics[PRUNED_NOW] == 0.0
    _, keep = codec.decode_slices(below, pruner.reference)
    assert all(bool(m.all()) for masks in keep.values() for m in masks)
    env.generator.manual_seed(101)
    _, metrics = run_trainer(hermes, record, _train_config(threshold=accuracy, val_fraction=0.5), env)
    assert metrics[PRUNED_NOW] == 1.0


def test_upload_bytes_are_the_pruned_models_entries_plus_bitmap():
    env = _client_env(partition=2)
    pruner = channel_pruner(env)
    record, metrics = run_trainer(hermes, get_codec("channel_slice_fp32").encode(pruner.reference), _train_config(0.0), env)
    _, keep = get_codec("channel_slice_fp32").decode_slices(record, pruner.reference)
    small, _ = pruner.build(pruner.masks_of(keep))
    kept = sum(t.numel() for t in small.state_dict().values() if t.is_floating_point())
    bits = sum(t.shape[d] for t in pruner.reference.values() for d in range(min(t.dim(), 2)))
    assert 0 < kept < sum(t.numel() for t in pruner.reference.values())
    assert metrics[KEPT_ENTRIES] == kept
    expected = len("values") + NPY_HEADER + 4 * kept + len("bitmap") + NPY_HEADER + math.ceil(bits / 8)
    assert record.count_bytes() == expected


# -- the server ------------------------------------------------------------------------------------

class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _strategy(**kwargs):
    strategy = Hermes(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, **kwargs)
    strategy._directory = NodeDirectory({0: 10, 1: 11, 2: 12})  # partition -> node
    return strategy


def test_download_holds_exactly_the_clients_kept_coordinates():
    model = _tiny_cnn()
    pruner = ChannelPruner(model, torch.zeros(1, 3, 32, 32))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = pruner.next_masks(pruner.build(pruner.full_masks())[0], pruner.full_masks(), 0.5, 0.5)
    keep = pruner.keep(masks)
    sentinel = 12345.0
    for name, t in global_state.items():  # mark every coordinate partition 0 does not hold
        t[~keep_coordinates(keep[name], t.shape)] = sentinel
    strategy = _strategy()
    strategy.masks[0] = keep
    messages = list(strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), _Grid([10, 11, 12])))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    codec = get_codec("channel_slice_fp32")
    raw = by_node[10].content[ARRAYS]["values"].numpy()
    assert raw.size == kept_entries(keep, global_state) and not (raw == sentinel).any()
    blocks, got = codec.decode_slices(by_node[10].content[ARRAYS], global_state)
    assert all(torch.equal(a, b) for n in keep for a, b in zip(got[n], keep[n]))
    assert all(torch.equal(blocks[n], slice_state(global_state, keep)[n]) for n in keep)
    assert payload_bytes(by_node[10].content) < payload_bytes(by_node[11].content)
    full = codec.decode(by_node[11].content[ARRAYS], global_state)  # partition 1 holds everything
    assert all(torch.equal(full[n], global_state[n]) for n in global_state)
    assert by_node[10].content[CONFIG][TRAINER] == "hermes"


def _reply(node, blocks, keep, n, instruction_node):
    instruction = Message(RecordDict({CONFIG: ConfigRecord()}), instruction_node, "train")
    instruction.metadata.__dict__["_message_id"] = f"m{node}"
    record = get_codec("channel_slice_fp32").encode_slices(blocks, keep)
    reply = Message(RecordDict({ARRAYS: record, METRICS: MetricRecord({NUM_EXAMPLES: n, LOCAL_ACCURACY: 0.5})}),
                    reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def _hand_example(mode):
    """Global w = 9 everywhere. A (n=1) holds rows {0,1} x cols {0,1} of w with value 1;
    B (n=3) holds row {1} x col {1} with value 5; nobody holds row 2."""
    global_state = {"layer.weight": torch.full((3, 2), 9.0), "layer.bias": torch.full((3,), 9.0)}
    t, f = True, False
    keep_a = {"layer.weight": (torch.tensor([t, t, f]), torch.tensor([t, t])), "layer.bias": (torch.tensor([t, t, f]),)}
    keep_b = {"layer.weight": (torch.tensor([f, t, f]), torch.tensor([f, t])), "layer.bias": (torch.tensor([f, t, f]),)}
    a = {"layer.weight": torch.full((2, 2), 1.0), "layer.bias": torch.full((2,), 1.0)}
    b = {"layer.weight": torch.full((1, 1), 5.0), "layer.bias": torch.full((1,), 5.0)}
    strategy = _strategy(aggregation=mode)
    strategy.global_state = strategy.reference = global_state
    replies = [_reply(11, b, keep_b, 3, 11), _reply(10, a, keep_a, 1, 10)]  # out of order on purpose
    arrays, metrics = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict(), strategy, keep_a, keep_b


def test_count_averages_over_the_holders():
    out, strategy, keep_a, keep_b = _hand_example("count")
    both = (1 * 1 + 3 * 5) / 4
    assert torch.equal(out["layer.weight"], torch.tensor([[1.0, 1.0], [1.0, both], [9.0, 9.0]]))
    assert torch.equal(out["layer.bias"], torch.tensor([1.0, both, 9.0]))
    # the server now holds each client's mask and personalized model
    assert all(torch.equal(a, b) for a, b in zip(strategy.masks[1]["layer.weight"], keep_b["layer.weight"]))
    assert torch.equal(strategy.personal[0]["layer.weight"], torch.full((2, 2), 1.0))


def test_all_averages_only_what_every_participant_holds():
    out, *_ = _hand_example("all")
    both = (1 * 1 + 3 * 5) / 4
    assert torch.equal(out["layer.weight"], torch.tensor([[9.0, 9.0], [9.0, both], [9.0, 9.0]]))
    assert torch.equal(out["layer.bias"], torch.tensor([9.0, both, 9.0]))


def test_a_mask_that_grows_is_rejected():
    _, strategy, keep_a, _ = _hand_example("count")
    grown = {"layer.weight": (torch.tensor([True, True, True]), torch.tensor([True, True])),
             "layer.bias": (torch.tensor([True, True, True]),)}
    blocks = {"layer.weight": torch.zeros(3, 2), "layer.bias": torch.zeros(3)}
    masks_before = dict(strategy.masks)
    assert strategy.aggregate_train(2, [_reply(11, blocks, grown, 3, 11)]) == (None, None)  # refused, not a crash
    assert len(strategy.rejections[2]) == 1 and "grow" in strategy.rejections[2][0]
    assert strategy.masks == masks_before


def test_state_dict_round_trip():
    _, strategy, keep_a, _ = _hand_example("count")
    restored = _strategy()
    restored.load_state_dict(strategy.state_dict())
    assert set(restored.masks) == {0, 1} and set(restored.personal) == {0, 1}
    assert all(torch.equal(x, y) for x, y in zip(restored.masks[0]["layer.weight"], keep_a["layer.weight"]))
    assert torch.equal(restored.global_state["layer.bias"], strategy.global_state["layer.bias"])


def test_options_are_checked():
    with pytest.raises(ConfigError, match="aggregation"):
        _strategy(aggregation="mean")
    with pytest.raises(ConfigError, match="prune_step"):
        _strategy(prune_step=1.5)
    with pytest.raises(ConfigError, match="codec.up"):
        _strategy(up_codec="topk_0.1")
    assert _strategy(up_codec="fp16").up_codec.name == "channel_slice_fp16"


def test_evaluate_dispatches_on_the_trainer_name():
    assert evaluator_for(ConfigRecord({TRAINER: "hermes"})) is hermes_evaluate
    assert evaluator_for(ConfigRecord({TRAINER: "no-evaluator-of-its-own"})).__name__ == "dense_evaluate"


# -- end to end ------------------------------------------------------------------------------------

def test_hermes_end_to_end_logs_personalized_accuracy_and_shrinking_uploads(tmp_path):
    summary, run_dir = run_inprocess(tmp_path, ["strategy=hermes", "strategy.accuracy_threshold=0.0",
                                                "fraction_evaluate=0.5", "+model.width=0.25", "+model.hidden=24"])
    rows = read_metrics(run_dir)
    assert summary["status"] == "complete" and [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert 0.0 <= row["fed_eval/personalized_accuracy"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
        assert 0.0 < row["train/pruned_fraction"] <= 0.5
        # every participant pruned this round: its upload is its kept entries (fp32) plus bitmap,
        # headers and metrics; far below the dense model
        kept_upload = 4 * row["clients"] * row["train/kept_entries"]
        assert kept_upload < row["up_bytes"] < kept_upload + row["clients"] * 1500
    dense = sum(t.numel() for t in get_model("cnn_small", num_classes=10, width=0.25, hidden=24).state_dict().values())
    assert rows[1]["up_bytes"] < 4 * dense * rows[1]["clients"]


def test_kept_entries_counts_the_coordinates_the_masks_keep():
    g = torch.Generator().manual_seed(0)
    reference = {"conv": torch.zeros(8, 3, 3, 3), "fc": torch.zeros(10, 72), "bias": torch.zeros(8),
                 "scalar": torch.zeros(())}
    for _ in range(5):
        keep = {name: tuple(torch.rand(t.shape[d], generator=g) < 0.6 for d in range(min(t.dim(), 2)))
                for name, t in reference.items()}
        assert kept_entries(keep, reference) == sum(int(keep_coordinates(keep[n], t.shape).sum())
                                                    for n, t in reference.items())
