"""FedDST (strategies/feddst.py, clients/feddst_trainer.py) and the bitmap codec, by observation:
budgets after every server step, zeros off the mask after every local step, masks that stay put
between readjustments and move by at most 2 ceil(alpha K_l) on them, a hand-computed three-client
aggregation, and bytes that are the serialized values plus bitmap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from clients.feddst_trainer import MASK_VERSION, readjust_count, readjust_masks, train_masked
from fl.data.imageset import ImageSet
from fl.errors import ConfigError
from fl.local_training import ClientData, TrainHyper
from fl.message_keys import ARRAYS, METRICS, NUM_EXAMPLES
from fl.models import get_model
from fl.payload import decode_bitmap, encode_bitmap, get_codec, has_bitmap, payload_bytes
from fl.run_logger import read_metrics
from fl.sparsity import apply_mask, magnitude_masks, prunable_shapes
from strategies.feddst import FedDST, erk_budgets, holder_weighted_mean
from tests.helpers import SMALL, SMALL_SYNTHETIC, compose_config, run_inprocess

NPY_HEADER = 128  # bytes NumPy's .npy header takes for each 1-D array Flower serializes


def _record_bytes(record: ArrayRecord) -> int:
    """What the codec should cost: for each array its key, the .npy header and the raw values."""
    return sum(len(key) + NPY_HEADER + record[key].numpy().nbytes for key in record)


# -- ERK allocation ------------------------------------------------------------------------------

def test_erk_budgets_hit_the_target_and_clamp_small_layers_dense():
    model = get_model("cnn_small", num_classes=10)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if t.dim() >= 2}
    budgets = erk_budgets(shapes, 0.8)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    assert sum(budgets.values()) == round(0.2 * sum(numel.values()))
    # the first conv and the classifier would exceed density 1: they are dense
    assert budgets["features.0.weight"] == numel["features.0.weight"]
    assert budgets["classifier.weight"] == numel["classifier.weight"]
    # the others get density proportional to sum(shape)/prod(shape) (to within one weight)
    sparse = [n for n in shapes if budgets[n] < numel[n]]
    eps = [budgets[n] / numel[n] / (sum(shapes[n]) / numel[n]) for n in sparse]
    assert max(eps) - min(eps) < 1e-3 * max(eps)
    forced = erk_budgets(shapes, 0.8, dense_layers=["features.3"])
    assert forced["features.3.weight"] == numel["features.3.weight"] and sum(forced.values()) == sum(budgets.values())


def test_the_cnn_small_figures_the_docs_quote():
    """docs/strategy-feddst.md quotes these figures and its marker names this file: ERK at S = 0.8
    on cnn_small (per-layer sparsity in whole percent) and the payload of its first mask, values
    only and with the bitmap, in fp32 and fp16, against FedAvg's dense one."""
    state = get_model("cnn_small", num_classes=10).state_dict()
    shapes = prunable_shapes(state)
    budgets = erk_budgets(shapes, 0.8)
    sparsity = {n: round(100 * (1 - budgets[n] / math.prod(s))) for n, s in shapes.items()}
    assert sparsity == {"features.0.weight": 0, "features.3.weight": 77, "features.6.weight": 89, "fc.weight": 79,
                        "classifier.weight": 0}
    assert math.prod(shapes["features.0.weight"]) == 864 and math.prod(shapes["classifier.weight"]) == 2200
    masks = magnitude_masks(state, budgets)
    sizes = {(values, with_bitmap): encode_bitmap(apply_mask(state, masks), masks, values=values,
                                                  with_bitmap=with_bitmap).count_bytes()
             for values in ("fp32", "fp16") for with_bitmap in (False, True)}
    assert sizes == {("fp32", False): 438855, ("fp32", True): 506829, ("fp16", False): 219633, ("fp16", True): 287607}
    assert get_codec("dense_fp32").encode(state).count_bytes() == 2186376


# -- bitmap codec --------------------------------------------------------------------------------

def _sparse_state():
    g = torch.Generator().manual_seed(0)
    state = {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g),
             "bn.num_batches_tracked": torch.tensor(7), "fc.weight": torch.randn(10, 72, generator=g)}
    masks = {name: torch.rand(state[name].shape, generator=g) < 0.3 for name in ("conv.weight", "fc.weight")}
    masks["fc.weight"][0, :5] = True
    state = {n: t * masks[n] if n in masks else t for n, t in state.items()}
    state["fc.weight"][0, 0] = 0.0  # a masked coordinate whose value is 0 (a freshly grown weight)
    return state, masks


@pytest.mark.parametrize("values", ["fp32", "fp16"])
def test_bitmap_round_trip(values):
    state, masks = _sparse_state()
    codec = get_codec(f"bitmap_{values}")
    out, out_masks = codec.decode_masked(codec.encode_masked(state, masks), state)
    for name, t in state.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        if values == "fp32" or not t.is_floating_point():
            assert torch.equal(out[name], t)
        else:
            assert torch.allclose(out[name], t, rtol=1e-3, atol=1e-4)
    assert all(torch.equal(out_masks[n], masks[n]) for n in masks)  # the zero-valued grown weight keeps its bit
    # without the bitmap the receiver decodes with the mask it holds; without one it cannot
    bare = codec.encode_masked(state, masks, with_bitmap=False)
    assert not has_bitmap(bare)
    assert torch.equal(codec.decode_masked(bare, state, masks)[0]["fc.weight"], out["fc.weight"])
    with pytest.raises(ValueError, match="no bitmap"):
        codec.decode_masked(bare, state)


@pytest.mark.parametrize("values,itemsize", [("fp32", 4), ("fp16", 2)])
@pytest.mark.parametrize("with_bitmap", [True, False])
def test_bitmap_size_is_values_plus_bitmap_as_serialized(values, itemsize, with_bitmap):
    state, masks = _sparse_state()
    record = encode_bitmap(state, masks, values=values, with_bitmap=with_bitmap)
    nnz = sum(int(m.sum()) for m in masks.values())
    assert record["values"].numpy().shape == (nnz,)  # one value per mask entry, nothing else
    assert record["dense"].numpy().shape == (8,)  # the bias travels whole
    bits = sum(m.numel() for m in masks.values())
    assert ("bitmap" in record) == with_bitmap
    if with_bitmap:
        assert record["bitmap"].numpy().nbytes == math.ceil(bits / 8)
    expected = (nnz * itemsize + 8 * itemsize + (math.ceil(bits / 8) if with_bitmap else 0) + 4 + 8  # layout, buffer
                + NPY_HEADER * len(record) + sum(len(k) for k in record))
    assert record.count_bytes() == expected == _record_bytes(record)
    assert payload_bytes(RecordDict({ARRAYS: record})) == expected + len(ARRAYS)


def test_plain_encode_takes_nonzeros_of_weight_tensors_as_mask():
    state, masks = _sparse_state()
    codec = get_codec("bitmap_fp32")
    out = codec.decode(codec.encode(state), state)
    assert all(torch.equal(out[n], state[n]) for n in state)
    _, inferred = decode_bitmap(codec.encode(state), state)
    assert int(inferred["fc.weight"].sum()) == int(masks["fc.weight"].sum()) - 1  # the zero-valued one is lost


# -- client: training under the mask and readjustment -------------------------------------------

def _tiny_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                      torch.randint(0, 10, (n,), generator=g).numpy(), 10, (0.5,) * 3, (0.25,) * 3)
    return ClientData(images, np.arange(n))


def _masked_model(sparsity=0.8):
    torch.manual_seed(0)
    model = get_model("cnn_small", num_classes=10, width=0.25, hidden=16)
    strategy = FedDST(sparsity=sparsity, r_end=10)
    strategy.initialize(model.state_dict())
    return model, strategy


def test_off_mask_weights_are_zero_after_every_local_step():
    torch.set_num_threads(1)
    model, strategy = _masked_model()
    masks = strategy.mask
    params = dict(model.named_parameters())
    steps = []

    def check(m):
        steps.append(all(int(params[n].detach()[~masks[n]].count_nonzero()) == 0 for n in masks))

    hyper = TrainHyper(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)  # momentum and decay would leak
    _, gradient = train_masked(model, _tiny_data(), hyper, torch.Generator().manual_seed(1), masks,
                               dense_gradient=True, after_step=check)
    assert len(steps) == 6 and all(steps)
    # the dense gradient reaches off-mask coordinates (that is what regrowth ranks)
    assert all(int(gradient[n][~masks[n]].count_nonzero()) > 0 for n in masks)


def test_readjustment_moves_each_layer_by_exactly_2n():
    model, strategy = _masked_model()
    masks = strategy.mask
    _, gradient = train_masked(model, _tiny_data(), TrainHyper(batch_size=8), torch.Generator().manual_seed(1),
                               masks, dense_gradient=True)
    alpha = 0.1
    new = readjust_masks(model, masks, gradient, alpha)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        k = int(mask.sum())
        n = readjust_count(alpha, k, mask.numel())
        assert n == math.ceil(alpha * k)
        assert int(new[name].sum()) == k  # as many grown as pruned
        assert int((new[name] ^ mask).sum()) == 2 * n <= 2 * math.ceil(alpha * k)
        grown = new[name] & ~mask
        assert int(params[name].detach()[grown].count_nonzero()) == 0  # grown weights start at 0
        assert int(params[name].detach()[~new[name]].count_nonzero()) == 0
        # the grown positions carry the largest gradient magnitudes among the formerly inactive
        inactive = gradient[name][~mask].abs()
        assert gradient[name][grown].abs().min() >= inactive.sort(descending=True).values[n - 1]


# -- server: the hand-built three-client aggregation ---------------------------------------------

def _reply(node, state, masks, n, *, bitmap=True, version=1):
    instruction = Message(RecordDict({"config": ConfigRecord()}), node, "train")
    instruction.metadata.__dict__["_message_id"] = f"m{node}"
    record = get_codec("bitmap_fp32").encode_masked(state, masks, with_bitmap=bitmap)
    reply = Message(RecordDict({ARRAYS: record, METRICS: MetricRecord({NUM_EXAMPLES: n, MASK_VERSION: version})}),
                    reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


# three clients with 1, 2 and 3 samples, each holding K = 3 of the six entries of a 2x3 weight "w"
MASKS = [[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]]
VALUES = [[1.0, 2.0, 0, -3.0, 0, 0], [4.0, 0, -6.0, -3.0, 0, 0], [0, 5.0, 9.0, -3.0, 0, 0]]
# holder-weighted by hand: (1*1 + 2*4)/3, (1*2 + 3*5)/4, (2*-6 + 3*9)/5, (1*-3 + 2*-3 + 3*-3)/6, no holder, no holder
AVERAGE = [3.0, 4.25, 3.0, -3.0, 0.0, 0.0]
HOLDERS = [3.0, 4.0, 5.0, 6.0, 0.0, 0.0]  # sum of n_k over the clients holding each entry


def _three_clients():
    strategy = FedDST(sparsity=0.5, r_end=10, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    strategy.initialize({"w": torch.arange(1.0, 7.0).reshape(2, 3), "b": torch.zeros(2)})
    strategy.reference = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    replies = []
    for node, (mask, value) in enumerate(zip(MASKS, VALUES), start=1):
        state = {"w": torch.tensor(value).reshape(2, 3), "b": torch.full((2,), float(node))}
        replies.append(_reply(node, state, {"w": torch.tensor(mask, dtype=torch.bool).reshape(2, 3)}, node))
    return strategy, replies


def test_holder_weighted_mean_by_hand():
    values = [torch.tensor(v) for v in VALUES]
    masks = [torch.tensor(m, dtype=torch.bool) for m in MASKS]
    mean, holders = holder_weighted_mean(values, masks, [1.0, 2.0, 3.0])
    assert torch.allclose(mean, torch.tensor(AVERAGE))  # 0 where no client holds the entry
    assert holders.tolist() == HOLDERS


def test_three_client_aggregation_by_hand():
    strategy, replies = _three_clients()
    assert strategy.budgets["w"] == 3
    arrays, metrics = strategy.aggregate_train(2, replies[::-1])  # reply order does not matter
    out = arrays.to_torch_state_dict()
    # re-pruned to K = 3 by magnitude: 4.25, then three entries tie at |3|; the ones held by more
    # sample weight (6 and 5) beat the one held by 3; the entries nobody holds stay 0
    assert torch.allclose(out["w"].reshape(-1), torch.tensor([0.0, 4.25, 3.0, -3.0, 0.0, 0.0]))
    assert strategy.mask["w"].reshape(-1).tolist() == [False, True, True, True, False, False]
    assert torch.allclose(out["b"], torch.full((2,), (1 * 1 + 2 * 2 + 3 * 3) / 6))  # sample-weighted bias
    assert metrics["feddst/mask_version"] == 2  # the mask moved: version 1 -> 2


def test_unsound_updates_are_rejected_not_averaged():
    strategy, replies = _three_clients()
    dense = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
    over = _reply(4, dense, {"w": torch.ones(2, 3, dtype=torch.bool)}, 100)  # six entries, budget three
    nan = _reply(5, {"w": torch.full((2, 3), float("nan")), "b": torch.zeros(2)},
                 {"w": torch.tensor(MASKS[0], dtype=torch.bool).reshape(2, 3)}, 100)
    arrays, _ = strategy.aggregate_train(2, replies + [over, nan])
    assert torch.allclose(arrays.to_torch_state_dict()["w"].reshape(-1), torch.tensor([0.0, 4.25, 3.0, -3.0, 0.0, 0.0]))
    assert len(strategy.rejections[2]) == 2


# -- server: bitmap only to clients that lack the current mask -----------------------------------

class _Grid:
    """Just enough of a Grid for sampling: nodes 1..n hold partitions 0..n-1."""

    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def partition_of(self, node):
        return node - 1


def test_bitmap_is_sent_only_to_clients_without_the_current_mask():
    torch.manual_seed(0)
    state = get_model("cnn_small", num_classes=10, width=0.25, hidden=16).state_dict()
    strategy = FedDST(sparsity=0.8, r_adj=100, r_end=10, fraction_train=1.0, min_train_nodes=1, min_available_nodes=3)
    grid, config = _Grid(3), ConfigRecord()
    first = list(strategy.configure_train(1, ArrayRecord(state), config, grid))
    assert all(has_bitmap(m.content[ARRAYS]) for m in first)
    # nodes 1 and 2 confirm version 1, node 3 fails: only node 3 gets the bitmap again
    replies = [_reply(node, strategy.reference, strategy.mask, 10, bitmap=False) for node in (1, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.mask_version == 1  # nobody readjusted: the mask cannot move
    second = list(strategy.configure_train(2, arrays, config, grid))
    assert [has_bitmap(m.content[ARRAYS]) for m in second] == [False, False, True]
    with_bitmap, without = second[2].content, second[0].content
    bitmap = with_bitmap[ARRAYS]["bitmap"]
    assert payload_bytes(with_bitmap) - payload_bytes(without) == len("bitmap") + NPY_HEADER + len(bitmap.numpy())
    # node 1's client raises (say it lost its state): it gets the bitmap next round
    error = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="lost"), reply_to=second[0])
    error.metadata.__dict__["_src_node_id"] = 1
    arrays, _ = strategy.aggregate_train(2, [error] + [_reply(node, strategy.reference, strategy.mask, 10, bitmap=False)
                                                      for node in (2, 3)])
    third = list(strategy.configure_train(3, arrays, config, grid))
    assert [has_bitmap(m.content[ARRAYS]) for m in third] == [True, False, False]
    # a checkpoint carries the mask, its version and who holds it
    restored = FedDST(sparsity=0.8, r_end=10)
    restored.load_state_dict(strategy.state_dict())
    assert restored.held == {1: 1, 2: 1} and restored.mask_version == 1
    assert all(torch.equal(restored.mask[n], strategy.mask[n]) for n in strategy.mask)


# -- end to end ----------------------------------------------------------------------------------

ROUNDS: list[dict] = []


class SpyFedDST(FedDST):
    """FedDST that records, per round, the mask before and after the server step and what clients sent."""

    def aggregate_updates(self, server_round, updates):
        replies = [u.reply for u in updates]
        before = {n: m.clone() for n, m in self.mask.items()}
        version = self.mask_version
        alpha = self.readjust_alpha(server_round)
        arrays, metrics = super().aggregate_updates(server_round, updates)
        uploads = [(r.content[ARRAYS], payload_bytes(r.content)) for r in replies]
        client_masks = [self.up_codec.decode_masked(record, self.reference, before)[1] for record, _ in uploads]
        ROUNDS.append(dict(round=server_round, alpha=alpha, before=before, after={n: m.clone() for n, m in self.mask.items()},
                           version=(version, self.mask_version), budgets=dict(self.budgets), state=arrays.to_torch_state_dict(),
                           uploads=uploads, client_masks=client_masks))
        return arrays, metrics


def test_feddst_rounds_keep_budgets_and_move_masks_only_on_readjustment(tmp_path):
    ROUNDS.clear()
    _, run_dir = run_inprocess(tmp_path, ["strategy=feddst", "strategy._target_=tests.test_feddst.SpyFedDST",
                                          "rounds=4", "strategy.r_adj=2", "strategy.r_end=4", "strategy.alpha=0.1",
                                          "strategy.alpha_schedule=constant"])
    rows = read_metrics(run_dir)[1:]
    assert [r["round"] for r in ROUNDS] == [1, 2, 3, 4]
    for info, row in zip(ROUNDS, rows):
        readjust = info["round"] % 2 == 0
        assert (info["alpha"] > 0) == readjust
        state = info["state"]
        for name, k in info["budgets"].items():
            if name not in info["after"]:  # ERK left it dense
                assert k == state[name].numel()
                continue
            mask = info["after"][name]
            assert int(mask.sum()) == k  # exactly the budget after every server step
            assert int(state[name][~mask].count_nonzero()) == 0
            if not readjust:  # active coordinates carry trained values (a regrown 0 behind a dead unit may stay 0)
                assert k - int(state[name].count_nonzero()) <= max(2, k // 1000)
        if not readjust:
            assert info["version"][0] == info["version"][1]
            assert all(torch.equal(info["before"][n], info["after"][n]) for n in info["before"])
            assert not any(has_bitmap(record) for record, _ in info["uploads"])
        for client_mask in info["client_masks"]:
            for name, mask in info["before"].items():
                k = info["budgets"][name]
                distance = int((client_mask[name] ^ mask).sum())
                assert distance <= (2 * math.ceil(0.1 * k) if readjust else 0)
        # uploaded bytes are the serialized values (+ bitmap): one value per mask entry
        for (record, size), client_mask in zip(info["uploads"], info["client_masks"]):
            assert record["values"].numpy().size == sum(int(m.sum()) for m in client_mask.values())
            assert ("bitmap" in record) == readjust
        assert row["up_bytes"] == sum(size for _, size in info["uploads"])
        assert (row["train/mask_hamming"] > 0) == readjust
        assert row["train/feddst/mask_version"] == info["version"][1]


def test_clients_decode_a_rounds_broadcast_once_per_record(tmp_path, monkeypatch):
    """Every client of a round receives the same record (one with the bitmap for nodes that lack
    the mask, one of values for those that hold it): it is decoded once, not once per client, and
    the run is the one whose golden hash tests/test_golden.py pins."""
    import sys

    from fl.payload import BitmapCodec

    calls: dict[int, int] = {}
    alive = []  # keeps every decoded record, so that no two share an id
    real = BitmapCodec.decode_masked

    def counted(self, record, reference, masks=None):
        if sys._getframe(1).f_globals["__name__"] == "clients.feddst_trainer":  # not the server's screening
            alive.append(record)
            calls[id(record)] = calls.get(id(record), 0) + 1
        return real(self, record, reference, masks)

    monkeypatch.setattr(BitmapCodec, "decode_masked", counted)
    _, run_dir = run_inprocess(tmp_path, ["strategy=feddst", "rounds=3", "num_clients=6", "fraction_fit=1.0"])
    rows = read_metrics(run_dir)[1:]
    assert [r["clients"] for r in rows] == [6, 6, 6]
    assert set(calls.values()) == {1} and 3 <= len(calls) <= 2 * 3  # a bitmap and/or a values record a round


def test_feddst_quick_run_is_cheaper_than_fedavg(tmp_path):
    summary, run_dir = run_inprocess(tmp_path / "dst", ["strategy=feddst", "codec.up=fp16", "fraction_evaluate=0.5"])
    _, dense_dir = run_inprocess(tmp_path / "avg", ["fraction_evaluate=0.5"])
    rows, dense = read_metrics(run_dir), read_metrics(dense_dir)
    assert summary["status"] == "complete" and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert {"train/feddst/density", "train/feddst/bitmaps_sent", "train/mask_hamming", "fed_eval/accuracy"} <= set(rows[1])
    assert abs(rows[1]["train/feddst/density"] - 0.1955) < 1e-3  # cnn_small at S = 0.8, ERK
    # fp16 values of ~20% of the weights plus a bitmap: well under a fifth of FedAvg's fp32 upload
    assert rows[-1]["cum_up_bytes"] < 0.2 * dense[-1]["cum_up_bytes"]
    assert rows[-1]["cum_down_bytes"] < 0.3 * dense[-1]["cum_down_bytes"]


@pytest.mark.parametrize("overrides,expected", [
    (["strategy=feddst_paper", "rounds=40"], dict(sparsity=0.8, alpha=0.01, r_adj=15, r_end=20)),
    (["strategy=feddst", "rounds=20"], dict(sparsity=0.8, alpha=0.05, r_adj=2, r_end=10)),
])
def test_configs_build_the_strategy(tmp_path, overrides, expected):
    from fl.config import build

    server = build(compose_config(SMALL + SMALL_SYNTHETIC + overrides), str(tmp_path))[0]
    strategy = server.make_strategy()
    assert isinstance(strategy, FedDST)
    assert {k: getattr(strategy, k) for k in expected} == expected
    assert strategy.readjust_alpha(expected["r_adj"]) > 0 and strategy.readjust_alpha(expected["r_end"] + expected["r_adj"]) == 0


def test_a_codec_feddst_cannot_send_is_a_config_error(tmp_path):
    from fl.config import build

    with pytest.raises(ConfigError, match="codec.up"):  # at config time, before any work
        build(compose_config(SMALL + SMALL_SYNTHETIC + ["strategy=feddst", "codec.up=int8"]), str(tmp_path))


def test_the_client_side_alone_knows_the_feddst_trainer():
    """A deployed SuperNode imports ``clients`` only, never ``strategies``: the trainer must register there."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = "import sys, clients; assert 'strategies' not in sys.modules; assert 'masked' in clients.TRAINERS"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
