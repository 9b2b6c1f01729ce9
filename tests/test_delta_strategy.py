"""DELTA-factorized FL (strategies/delta.py, clients/delta_trainer.py), by observation: a client's
upload is exactly its tier's slice as serialized; E and the base classifier stay bit-identical;
smaller tiers' slices are prefixes of larger ones'; a coordinate only wide tiers cover is averaged
over those clients only, on a hand-computed example; E travels once per version; a quick run."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients.delta_trainer import delta, delta_evaluate
from clients.trainer import run_trainer
from clients.trainer import TRAINER, ClientEnv
from fl.delta.network import DeltaArch, FusedDelta, delta_params, tier_shapes
from fl.delta.slices import (DELTA_TIER, FROZEN_STATE, WIDTH, WITH_FROZEN, blocks_for, download_layout, is_frozen,
                             is_trainable, upload_layout)
from fl.errors import ConfigError
from fl.local_training import ClientData
from fl.message_keys import ARRAYS, CONFIG, EPOCHS, LR, METRICS, NUM_EXAMPLES, PARTITION_ID
from fl.node_directory import NodeDirectory
from fl.payload import get_codec, payload_bytes
from fl.run_logger import read_metrics
from fl.specs import ClientSpec, DataSpec, ModelSpec, freeze
from strategies.delta import DEFAULT_TIERS, DeltaFactorized
from tests.helpers import compose_config, run_inprocess
from tests.test_delta_network import tiny_arch

SLICE = get_codec("channel_slice_fp32")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed=0) -> FusedDelta:
    torch.manual_seed(seed)
    return FusedDelta(tiny_arch(image_size=32)).eval()


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _strategy(model, widths=None, partitions=4, **kwargs):
    """Partition p is node 10 + p; ``widths`` fixes each partition's tier width."""
    strategy = DeltaFactorized(fraction_train=1.0, min_train_nodes=1, min_available_nodes=partitions,
                               build_model=lambda: model, **kwargs)
    strategy._directory = NodeDirectory({p: 10 + p for p in range(partitions)})
    if widths is not None:
        strategy.width_of = lambda partition: widths[partition]
    return strategy


def _messages(strategy, model, server_round=1, config=None):
    nodes = list(strategy._directory.node_of_partition.values())
    config = config or ConfigRecord({LR: 0.05, EPOCHS: 1})
    return {m.metadata.dst_node_id - 10: m for m in
            strategy.configure_train(server_round, ArrayRecord(model.state_dict()), config, _Grid(nodes))}


def _reply(partition, record, n):
    instruction = Message(RecordDict({CONFIG: ConfigRecord()}), 10 + partition, "train")
    instruction.metadata.__dict__["_message_id"] = f"m{partition}"
    reply = Message(RecordDict({ARRAYS: record, METRICS: MetricRecord({NUM_EXAMPLES: n})}), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = 10 + partition
    return reply


def _env(partition=0, server_round=1, state=None):
    spec = ClientSpec(data=DataSpec("synthetic", num_clients=4, seed=0,
                                    options=freeze({"samples_per_client": 12, "test_size": 16})),
                      model=ModelSpec("delta_fused"), seed=0)
    federation = spec.data.federation()
    return ClientEnv(spec=spec, federation=federation,
                     data=ClientData(federation.train, federation.client_indices[partition]), partition_id=partition,
                     server_round=server_round, state=RecordDict() if state is None else state,
                     generator=torch.Generator().manual_seed(100 + server_round))


# -- the client's upload is exactly its slice -------------------------------------------------------------

@pytest.mark.parametrize("width", DEFAULT_TIERS)
def test_upload_is_exactly_the_tiers_slice(width):
    model = _model()
    strategy = _strategy(model, widths={p: width for p in range(4)})
    message = _messages(strategy, model)[0]
    reply, metrics = run_trainer(delta, message.content[ARRAYS], message.content[CONFIG], _env())
    arch = model.arch
    shapes = tier_shapes(arch, width)
    values = reply["values"].numpy()
    assert values.dtype.name == "float32" and values.size == delta_params(arch.scaled(width) if width < 1 else arch)
    assert values.size == sum(math.prod(s) for s in shapes.values())
    # byte for byte the serialized width-w slice of the DELTA: no E, no classifier
    full = model.state_dict()
    reference, keep = upload_layout(full, arch.to_json(), width, with_edge=False)
    assert set(reference) == {n for n in full if is_trainable(n)}
    expected = SLICE.encode_slices({n: torch.zeros(shapes[n]) for n in reference}, keep)
    assert reply.count_bytes() == expected.count_bytes()
    assert metrics[NUM_EXAMPLES] < len(_env().data)  # a held-out split stays home


def test_the_smallest_tier_uploads_at_most_a_fifth_of_the_full_tiers_bytes():
    """On the shipped DELTA's architecture (112,956 parameters, half of them the adapter), the serialized
    upload of every tier (values + channel bitmap, as the client sends it) falls tier by tier, and
    the width-0.354 tier's is at most 20% of the full tier's."""
    arch = DeltaArch(num_classes=10, in_channels=3, image_size=32, convs=(13, 22, 23, 18, 35, 34),
                     pools=(True, True, False, True, False, True),
                     se_hidden=8, delta_dim=32, resizer_hidden=64, edge_pool_dim=128, edge_feat_dim=220,
                     feature_dim=256, edge=("cnn_small", ()))
    full = FusedDelta(arch).state_dict()
    sent = []
    for width in DEFAULT_TIERS:
        reference, keep = upload_layout(full, arch.to_json(), width, with_edge=False)
        sent.append(SLICE.encode_slices(blocks_for(full, reference, keep), keep).count_bytes())
    assert sent == sorted(sent, reverse=True) and len(set(sent)) == len(sent)
    assert sent[-1] <= 0.20 * sent[0], [round(b / sent[0], 3) for b in sent]


def test_the_run_starts_by_logging_every_tiers_parameters_and_upload_bytes(caplog):
    model = _model()
    strategy = _strategy(model)
    with caplog.at_level("INFO", logger="strategies.delta"):
        _messages(strategy, model)
        _messages(strategy, model, server_round=2)  # once per run, not per round
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DELTA tier")]
    assert len(lines) == len(DEFAULT_TIERS)
    for line, width in zip(lines, DEFAULT_TIERS):
        params = delta_params(model.arch.scaled(width) if width < 1 else model.arch)
        assert line.startswith(f"DELTA tier w{width:.3f}: {params:,} parameters")


def test_the_client_trains_only_the_delta():
    model = _model()
    strategy = _strategy(model, widths={p: 0.5 for p in range(4)})
    message = _messages(strategy, model)[0]
    reply, _ = run_trainer(delta, message.content[ARRAYS], message.content[CONFIG], _env())
    reference, keep = upload_layout(model.state_dict(), model.arch.to_json(), 0.5, with_edge=False)
    blocks, _ = SLICE.decode_slices(reply, reference)
    sent, _ = SLICE.decode_slices(message.content[ARRAYS], download_layout(
        model.state_dict(), model.arch.to_json(), 0.5, with_frozen=True)[0])
    assert any(not torch.equal(blocks[n], sent[n]) for n in blocks)  # the DELTA moved
    assert set(blocks) == {n for n in model.state_dict() if is_trainable(n)}  # and only the DELTA travels back


def test_frozen_parts_travel_once_per_version_and_a_node_without_them_fails():
    model = _model()
    strategy = _strategy(model, widths={p: 0.5 for p in range(4)})
    first = _messages(strategy, model, 1)
    assert all(m.content[CONFIG][WITH_FROZEN] for m in first.values())
    state = RecordDict()
    reply, _ = run_trainer(delta, first[0].content[ARRAYS], first[0].content[CONFIG], _env(0, 1, state))
    held = state[FROZEN_STATE].to_torch_state_dict()
    assert set(held) == {n for n in model.state_dict() if is_frozen(n)}
    assert all(torch.equal(held[n], model.state_dict()[n]) for n in held)
    strategy.aggregate_train(1, [_reply(0, reply, 5)])  # partition 0 replied: it holds version 0
    second = _messages(strategy, model, 2)
    assert not second[0].content[CONFIG][WITH_FROZEN] and second[1].content[CONFIG][WITH_FROZEN]
    assert payload_bytes(second[0].content) < payload_bytes(second[1].content) / 10
    run_trainer(delta, second[0].content[ARRAYS], second[0].content[CONFIG], _env(0, 2, state))  # uses what it kept
    with pytest.raises(RuntimeError, match="holds version None"):
        run_trainer(delta, second[0].content[ARRAYS], second[0].content[CONFIG], _env(0, 2, RecordDict()))


def test_a_rounds_downloads_are_built_and_decoded_once_per_tier(monkeypatch):
    """One download record per tier (and per with/without E and C_B) a round, shared by its
    messages; the clients decode each once, and the nodes that got E and C_B in one download then
    hold one record of them, read once a round. Each message still counts its own bytes."""
    from fl.payload.slices import SliceCodec

    model = _model()
    strategy = _strategy(model, widths={0: 0.5, 1: 0.5, 2: 1.0, 3: 1.0})
    decodes: list = []
    real = SliceCodec.decode_slices
    monkeypatch.setattr(SliceCodec, "decode_slices",
                        lambda self, record, reference: decodes.append(record) or real(self, record, reference))
    first = _messages(strategy, model, 1)
    assert len({id(m.content[ARRAYS]) for m in first.values()}) == 2
    assert payload_bytes(first[0].content) == payload_bytes(first[1].content)
    states = {p: RecordDict() for p in first}
    replies = {p: run_trainer(delta, m.content[ARRAYS], m.content[CONFIG], _env(p, 1, states[p]))[0]
               for p, m in first.items()}
    assert len(decodes) == 2
    assert states[0][FROZEN_STATE] is states[1][FROZEN_STATE] is not states[2][FROZEN_STATE]
    strategy.aggregate_train(1, [_reply(p, r, 5) for p, r in replies.items()])
    second = _messages(strategy, model, 2)
    assert not any(m.content[CONFIG][WITH_FROZEN] for m in second.values())
    reads = []
    for held in {id(st[FROZEN_STATE]): st[FROZEN_STATE] for st in states.values()}.values():
        monkeypatch.setattr(held, "to_torch_state_dict", lambda real=held.to_torch_state_dict: reads.append(1) or real())
    for p, m in second.items():
        run_trainer(delta, m.content[ARRAYS], m.content[CONFIG], _env(p, 2, states[p]))
    downloads = [m.content[ARRAYS] for m in second.values()]
    assert sum(any(r is d for d in downloads) for r in decodes) == 2 and len(reads) == 2


def test_the_evaluator_scores_the_tier_model_on_the_held_out_split():
    model = _model()
    strategy = _strategy(model, widths={p: 0.5 for p in range(4)}, fraction_evaluate=1.0, tier_eval_every=1)
    nodes = list(strategy._directory.node_of_partition.values())
    messages = list(strategy.configure_evaluate(1, ArrayRecord(model.state_dict()), ConfigRecord(), _Grid(nodes)))
    assert messages[0].content[CONFIG][TRAINER] == "delta"
    metrics = delta_evaluate(messages[0].content[ARRAYS], messages[0].content[CONFIG], _env())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics[NUM_EXAMPLES] == 2  # 20% of 12
    assert metrics["tier_width"] == 0.5


# -- nested slices and the aggregation -------------------------------------------------------------------------

def test_a_smaller_tiers_download_is_a_prefix_of_a_larger_ones():
    model = _model()
    widths = dict(enumerate(DEFAULT_TIERS))
    strategy = _strategy(model, widths=widths)
    messages = _messages(strategy, model)
    full, arch_json = model.state_dict(), model.arch.to_json()
    decoded = {}
    for p, m in messages.items():
        assert m.content[CONFIG][WIDTH] == widths[p]
        reference, keep = download_layout(full, arch_json, widths[p], with_frozen=True)
        decoded[p], got = SLICE.decode_slices(m.content[ARRAYS], reference)
        for name in reference:
            assert all(torch.equal(a, b) for a, b in zip(got[name], keep[name]))
            assert torch.equal(decoded[p][name], full[name][tuple(slice(0, int(k.sum())) for k in keep[name])])
    for wide, narrow in zip(range(3), range(1, 4)):
        for name, block in decoded[narrow].items():
            assert all(s <= w for s, w in zip(block.shape, decoded[wide][name].shape))
            assert torch.equal(block, decoded[wide][name][tuple(slice(0, s) for s in block.shape)])
    sizes = [payload_bytes(messages[p].content) for p in range(4)]
    assert sizes == sorted(sizes, reverse=True)


def _upload(model, width, value):
    reference, keep = upload_layout(model.state_dict(), model.arch.to_json(), width, with_edge=False)
    shapes = tier_shapes(model.arch, width)
    return SLICE.encode_slices({n: torch.full(shapes[n], value) for n in reference}, keep)


def test_coordinates_only_wide_tiers_cover_are_averaged_over_those_clients_only():
    """DELTA = 9 everywhere. A (width 1, n=1) uploads 1s; B (width 1/2, n=3) uploads 5s. Inside B's
    slice: (1*1 + 3*5) / 4 = 4; covered by A alone: 1. Then B alone: outside its slice stays 1."""
    model = _model()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if is_trainable(name):
                t.fill_(9.0)
    strategy = _strategy(model, widths={0: 1.0, 1: 0.5, 2: 0.5, 3: 0.5})
    _messages(strategy, model)
    arrays, _ = strategy.aggregate_train(1, [_reply(0, _upload(model, 1.0, 1.0), 1), _reply(1, _upload(model, 0.5, 5.0), 3)])
    new = arrays.to_torch_state_dict()
    narrow = tier_shapes(model.arch, 0.5)
    before = model.state_dict()
    for name, t in new.items():
        if not is_trainable(name):
            assert torch.equal(t, before[name]), name  # E and the classifier: bit-identical
            continue
        inside = torch.zeros(t.shape, dtype=torch.bool)
        inside[tuple(slice(0, s) for s in narrow[name])] = True
        assert torch.all(t[inside] == 4.0), name
        assert torch.all(t[~inside] == 1.0), name
    model.load_state_dict(new)
    _messages(strategy, model, 2)
    arrays, _ = strategy.aggregate_train(2, [_reply(2, _upload(model, 0.5, 7.0), 2)])
    newer = arrays.to_torch_state_dict()
    for name, t in newer.items():
        if is_trainable(name):
            inside = torch.zeros(t.shape, dtype=torch.bool)
            inside[tuple(slice(0, s) for s in narrow[name])] = True
            assert torch.all(t[inside] == 7.0) and torch.all(t[~inside] == 1.0), name  # uncovered: unchanged


def test_an_upload_cut_to_another_tier_is_rejected():
    model = _model()
    strategy = _strategy(model, widths={0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5})
    _messages(strategy, model)
    arrays, _ = strategy.aggregate_train(1, [_reply(0, _upload(model, 1.0, 1.0), 1), _reply(1, _upload(model, 0.5, 2.0), 1)])
    assert len(strategy.rejections[1]) == 1 and "partition 0" in strategy.rejections[1][0]
    assert arrays is not None


def test_edge_rounds_average_e_and_resend_it():
    model = _model()
    strategy = _strategy(model, widths={p: 0.5 for p in range(4)}, edge_every=2)
    first = _messages(strategy, model, 1)
    assert not first[0].content[CONFIG]["delta.train-edge"]
    strategy.aggregate_train(1, [_reply(0, _upload(model, 0.5, 1.0), 1)])
    second = _messages(strategy, model, 2)
    assert second[0].content[CONFIG]["delta.train-edge"] and not second[0].content[CONFIG][WITH_FROZEN]
    state = RecordDict()
    run_trainer(delta, first[0].content[ARRAYS], first[0].content[CONFIG], _env(0, 1, state))
    reply, _ = run_trainer(delta, second[0].content[ARRAYS], second[0].content[CONFIG], _env(0, 2, state))
    arrays, _ = strategy.aggregate_train(2, [_reply(0, reply, 4)])
    new = arrays.to_torch_state_dict()
    assert any(not torch.equal(new[n], model.state_dict()[n]) for n in new if n.startswith("edge."))
    assert all(torch.equal(new[n], model.state_dict()[n]) for n in new if n.startswith("classifier."))
    assert strategy.frozen_version == 1
    model.load_state_dict(new)
    assert _messages(strategy, model, 3)[0].content[CONFIG][WITH_FROZEN]  # the new E goes out again


# -- tiers ------------------------------------------------------------------------------------------------------

def test_equal_assignment_puts_a_quarter_of_the_clients_in_each_tier():
    strategy = DeltaFactorized(fraction_train=0.8, min_available_nodes=100, build_model=_model)
    widths = [strategy.width_of(p) for p in range(100)]
    assert {w: widths.count(w) for w in DEFAULT_TIERS} == {w: 25 for w in DEFAULT_TIERS}
    again = DeltaFactorized(fraction_train=0.8, min_available_nodes=100, build_model=_model)
    assert widths == [again.width_of(p) for p in range(100)]


def test_profile_assignment_gives_faster_devices_wider_tiers():
    device = compose_config(["device=edge_mix"]).device
    strategy = DeltaFactorized(fraction_train=0.8, min_available_nodes=40, build_model=_model,
                               tier_assignment="profiles", device=dict(device))
    from fl.clock import clock_spec

    profiles = clock_spec(dict(device), 0, 0).assign(40)
    by_profile = {p.name: strategy.width_of(i) for i, p in enumerate(profiles)}
    assert by_profile == {"laptop": 1.0, "jetson_nano": DEFAULT_TIERS[1], "phone_midrange": 0.5,
                          "raspberry_pi4": DEFAULT_TIERS[3]}


def test_bad_options_are_config_errors():
    for kwargs, key in (({"tiers": [0.5, 1.0]}, "strategy.tiers"), ({"tier_assignment": "random"}, "tier_assignment"),
                        ({"tier_assignment": "profiles"}, "tier_assignment"), ({"edge_every": -1}, "edge_every")):
        with pytest.raises(ConfigError, match=key):
            DeltaFactorized(min_available_nodes=4, build_model=_model, **kwargs)
    with pytest.raises(ConfigError, match="model=delta"):
        DeltaFactorized(min_available_nodes=4, build_model=lambda: torch.nn.Linear(2, 2))


# -- configs and one quick run ------------------------------------------------------------------------------------

def test_presets_compose():
    cfg = compose_config(["sim=delta_100clients"])
    assert cfg.strategy._target_ == "strategies.delta.DeltaFactorized" and cfg.model.name == "delta_fused"
    assert (cfg.num_clients, cfg.fraction_fit, cfg.data.partition.classes_per_client) == (100, 0.8, 3)
    arms = {}
    for arm in ("delta", "fedavg_edge", "fedavg_base", "hermes_base", "feddst_base"):
        c = compose_config(["sim=delta_compare", f"+arm={arm}"])
        arms[arm] = (c.strategy._target_.rsplit(".", 1)[1], c.model.name, c.model.get("role"))
        assert c.model.pair == cfg.model.pair  # one pair for every arm
    assert arms == {"delta": ("DeltaFactorized", "delta_fused", None), "fedavg_edge": ("FedAvg", "pretrained", "edge"),
                    "fedavg_base": ("FedAvg", "pretrained", "base"), "hermes_base": ("Hermes", "pretrained", "base"),
                    "feddst_base": ("FedDST", "pretrained", "base")}


TINY = ["model.pair.server_samples=48", "model.pair.base.name=vgg8", "model.pair.base.width=0.125",
        "+model.pair.edge.width=0.25", "+model.pair.edge.hidden=16", "model.pair.base_recipe.epochs=1",
        "model.pair.edge_recipe.epochs=1", "model.construction.extract.epochs=1",
        "model.construction.extract.finetune.epochs=0", "model.construction.train.epochs=1",
        "model.construction.kd=null", "model.construction.extract.budget=1.0",
        "model.construction.extract.delta_dim=6", "model.construction.extract.resizer_hidden=8"]


def test_quick_run_keeps_e_and_the_classifier_and_sends_slices(tmp_path):
    summary, run_dir = run_inprocess(tmp_path / "run", [
        "sim=delta_100clients", "num_clients=8", "fraction_fit=0.5", f"model.cache_dir={tmp_path}/cache",
        "strategy.tier_eval_every=1", "checkpoint_every=2", *TINY])
    assert summary["status"] == "complete"
    rows = read_metrics(run_dir)
    assert rows[-1]["train/w0.354/global_accuracy"] is not None and rows[-1]["accuracy"] is not None
    assert rows[2]["down_bytes"] < rows[1]["down_bytes"]  # E went out once to the clients of round 1
    from fl.checkpoint import load_checkpoint
    from fl.models import get_model

    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.round == 2 and checkpoint.strategy["delivered"]  # who holds E survives a resume

    initial = get_model("delta_fused", num_classes=10, **{k: v for k, v in _model_options(tmp_path).items()})
    for name, t in initial.state_dict().items():
        if is_frozen(name):
            assert torch.equal(checkpoint.arrays[name], t), name


def _model_options(tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_config(["sim=delta_100clients", "num_clients=8", f"model.cache_dir={tmp_path}/cache",
                          "data.samples_per_client=16", "data.test_size=64", *TINY])
    options = OmegaConf.to_container(cfg.model, resolve=True)
    options.pop("name")
    return options


class _QueryGrid(_Grid):
    """A deployment's grid as the directory sees it: nodes answer the partition query, some with
    the DELTA tier their device reported (fl.deploy.device)."""

    def __init__(self, answers):
        super().__init__(answers)
        self.answers = answers  # node -> (partition, tier or None)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            partition, tier = self.answers[message.metadata.dst_node_id]
            metrics = {PARTITION_ID: partition, **({} if tier is None else {DELTA_TIER: tier})}
            reply = Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            replies.append(reply)
        return replies


def test_a_tier_reported_by_a_device_overrides_the_assignment():
    grid = _QueryGrid({21: (0, 3), 22: (1, None), 23: (2, 0), 24: (3, None)})
    directory = NodeDirectory.discover(grid)
    assert directory.node_of_partition == {0: 21, 1: 22, 2: 23, 3: 24}
    assert directory.reported == {0: {DELTA_TIER: 3}, 2: {DELTA_TIER: 0}}
    strategy = DeltaFactorized(fraction_train=1.0, min_train_nodes=1, min_available_nodes=4, build_model=_model)
    assigned = [strategy.tier_index(p) for p in range(4)]  # the run's own (seeded, equal) assignment
    strategy._directory = directory
    assert [strategy.tier_index(p) for p in range(4)] == [3, assigned[1], 0, assigned[3]]
    strategy._directory = NodeDirectory({0: 21}, {0: {DELTA_TIER: 9}})
    with pytest.raises(ValueError, match="reported tier 9"):
        strategy.tier_index(0)
