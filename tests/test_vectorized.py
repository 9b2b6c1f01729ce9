"""Vectorized clients (fl/vectorized.py) equal the sequential trainer (fl/local_training.train_dense)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fl.local_training import ClientData, TrainHyper, train_dense
from fl.vectorized import groups, side_by_side, train_dense_vectorized, unsupported_reason


class _Images:
    """An in-memory image set with the ImageSet ``get`` contract."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def get(self, idx):
        idx = torch.as_tensor(np.asarray(idx))
        return self.x[idx], self.y[idx]


def _images(n=200, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _Images(torch.randn(n, 3, 8, 8, generator=g) * 2 + 0.5, torch.randint(0, classes, (n,), generator=g))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3))


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


# client sizes: equal ones share a vmap; 33 in batches of 16 ends on one sample (joins the one
# before it under BatchNorm), 7 is a single short batch
SIZES = (40, 40, 33, 40, 7, 33)


def _clients(sizes=SIZES):
    images = _images()
    order = np.random.default_rng(1).permutation(len(images.x))
    clients, start = [], 0
    for n in sizes:
        clients.append(ClientData(images, order[start:start + n]))
        start += n
    return clients


def _generators(n, round_=3):
    return [torch.Generator().manual_seed(1000 * round_ + k) for k in range(n)]


def _both_ways(make, hyper, sizes=SIZES):
    model = make()
    received = {k: v.clone() for k, v in model.state_dict().items()}
    clients = _clients(sizes)
    sequential = []
    for data, g in zip(clients, _generators(len(clients))):
        model.load_state_dict(received)
        metrics = train_dense(model, data, hyper, g)
        sequential.append(({k: v.clone() for k, v in model.state_dict().items()}, metrics))
    states, metrics = train_dense_vectorized(copy.deepcopy(make()), received, clients, hyper, _generators(len(clients)))
    return sequential, list(zip(states, metrics))


def _max_relative_difference(sequential, vectorized):
    worst = 0.0
    for (s_state, s_metrics), (v_state, v_metrics) in zip(sequential, vectorized):
        assert list(s_state) == list(v_state)
        for name, expected in s_state.items():
            got = v_state[name]
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            if not expected.is_floating_point():
                assert torch.equal(got, expected), name
                continue
            scale = max(float(expected.abs().max()), 1.0)
            worst = max(worst, float((got - expected).abs().max()) / scale)
        assert s_metrics.keys() == v_metrics.keys()
        assert v_metrics["train_accuracy"] == s_metrics["train_accuracy"]
        assert v_metrics["train_loss"] == pytest.approx(s_metrics["train_loss"], rel=1e-5, abs=1e-6)
    return worst


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.0, 0.0)])
def test_vectorized_equals_sequential_without_batchnorm(momentum, weight_decay):
    hyper = TrainHyper(epochs=2, batch_size=16, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    worst = _max_relative_difference(*_both_ways(_cnn, hyper))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("bn_stats", ["global", "local", "ema"])
def test_vectorized_equals_sequential_with_batchnorm(bn_stats):
    hyper = TrainHyper(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, bn_stats=bn_stats)
    worst = _max_relative_difference(*_both_ways(_bn_net, hyper))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("make", [_cnn, _bn_net], ids=["cnn", "batchnorm"])
def test_vectorized_under_a_mask_equals_the_sequential_masked_trainer(make):
    """FedDST-like's local training (``train_masked`` without its dense gradient): every weight as
    sequential, and every masked weight exactly 0 off its mask after training."""
    from clients.feddst_trainer import train_masked

    hyper = TrainHyper(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4)
    model = make()
    g = torch.Generator().manual_seed(7)
    masks = {name: torch.rand(p.shape, generator=g) < 0.4 for name, p in model.named_parameters() if p.dim() >= 2}
    received = {k: (v * masks[k] if k in masks else v).clone() for k, v in model.state_dict().items()}
    clients = _clients()
    sequential = []
    for data, gen in zip(clients, _generators(len(clients))):
        model.load_state_dict(received)
        metrics, _ = train_masked(model, data, hyper, gen, masks)
        sequential.append(({k: v.clone() for k, v in model.state_dict().items()}, metrics))
    states, metrics = train_dense_vectorized(copy.deepcopy(make()), received, clients, hyper,
                                             _generators(len(clients)), masks)
    assert _max_relative_difference(sequential, list(zip(states, metrics))) <= 1e-5
    assert all(int(state[name][~mask].count_nonzero()) == 0 for state in states for name, mask in masks.items())
    dense, _ = train_dense_vectorized(copy.deepcopy(make()), received, clients, hyper, _generators(len(clients)))
    assert any(int(dense[0][name][~mask].count_nonzero()) > 0 for name, mask in masks.items())  # the mask mattered


@pytest.mark.parametrize("min_size", [1, 16])
def test_one_gather_per_step_gives_each_clients_own_minibatches(min_size):
    """The accelerator's path (the K clients' samples stacked once, one gather a step), here on CPU
    tensors, yields each client's ``ClientData.batches``: same order, same bounds, same values."""
    datas = _clients((40, 40, 40))
    pairs = [data.images.get(data.indices) for data in datas]
    samples = torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
    cpu = torch.device("cpu")
    gathered = list(side_by_side(datas, _generators(3), 16, min_size, cpu, samples))
    per_client = [list(data.batches(16, g, min_size)) for data, g in zip(datas, _generators(3))]
    assert len(gathered) == len(per_client[0]) == (3 if min_size == 1 else 2)
    for step, (x, y) in enumerate(gathered):
        for i in range(len(datas)):
            assert torch.equal(x[i], per_client[i][step][0]) and torch.equal(y[i], per_client[i][step][1])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the CPU's per-client path: the same
               for a, b in zip(gathered, side_by_side(datas, _generators(3), 16, min_size, cpu, None)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: trains vectorized clients on it")
def test_vectorized_clients_on_a_gpu_track_the_cpu():
    hyper = TrainHyper(epochs=2, batch_size=16, lr=0.05, momentum=0.9)
    model = _cnn()
    received = {k: v.clone() for k, v in model.state_dict().items()}
    clients = _clients((40, 40, 40, 33))
    on_cpu = train_dense_vectorized(copy.deepcopy(model), received, clients, hyper, _generators(4))
    on_gpu = train_dense_vectorized(copy.deepcopy(model).cuda(), received, clients, hyper, _generators(4))
    for (cpu_state, cpu_metrics), (gpu_state, gpu_metrics) in zip(zip(*on_cpu), zip(*on_gpu)):
        for name, expected in cpu_state.items():
            scale = max(float(expected.abs().max()), 1.0)
            assert float((gpu_state[name].cpu() - expected).abs().max()) / scale <= 1e-3, name  # TF32, cuDNN
        assert gpu_metrics["train_loss"] == pytest.approx(cpu_metrics["train_loss"], rel=1e-3)


def test_clients_are_grouped_by_step_schedule():
    hyper = TrainHyper(batch_size=16)
    clients = _clients()
    assert groups(clients, hyper, min_size=1) == [[0, 1, 3], [2, 5], [4]]
    # under BatchNorm 33 samples are batches (16, 17): still their own group
    assert groups(clients, hyper, min_size=2) == [[0, 1, 3], [2, 5], [4]]


def test_dropout_is_refused_with_a_reason():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(192, 3))
    assert "Dropout" in unsupported_reason(model)
    with pytest.raises(ValueError, match="Dropout"):
        train_dense_vectorized(model, model.state_dict(), _clients((8,)), TrainHyper(), _generators(1))
    assert unsupported_reason(_cnn()) is None


# -- the in-process engine with engine.batch_clients ------------------------------------------------

def _rows_close(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key, va in ra.items():
            if key == "wall_s" or "seconds" in key:
                continue
            if "bytes" in key or not isinstance(va, float):
                assert va == rb[key], key  # byte accounting and counts: identical
            else:
                assert va == pytest.approx(rb[key], rel=1e-4, abs=1e-5), key


def _final_models_close(seq_dir, vec_dir):
    """The two runs' final models, every weight within 1e-5 of its tensor's scale."""
    a, b = torch.load(seq_dir / "final_model.pt"), torch.load(vec_dir / "final_model.pt")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) / max(float(a[k].abs().max()), 1.0) for k in a if a[k].is_floating_point())
    assert worst <= 1e-5, worst
    return a, b


def test_engine_batch_clients_gives_the_sequential_run(tmp_path, monkeypatch):
    import clients.batched
    from fl.run_logger import read_metrics
    from tests.helpers import run_inprocess

    calls = []
    batched_call = clients.batched.ClientBatching.__call__

    def counted(self, work):
        replies = batched_call(self, work)
        calls.append(len(work))
        return replies

    monkeypatch.setattr(clients.batched.ClientBatching, "__call__", counted)

    overrides = ["seed=3", "rounds=2", "train.momentum=0.9", "num_clients=8", "fraction_fit=0.5"]
    _, seq_dir = run_inprocess(tmp_path / "seq", overrides)
    _, vec_dir = run_inprocess(tmp_path / "vec", overrides + ["engine.batch_clients=3"])
    _final_models_close(seq_dir, vec_dir)
    _rows_close(read_metrics(seq_dir), read_metrics(vec_dir))
    assert sorted(calls) == [2, 2, 2, 2]  # 4 clients a round spread over the 2 threads (at most 3), none fell back


def _train_messages(records: list) -> list:
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fl.message_keys import ARRAYS, CONFIG

    return [Message(RecordDict({ARRAYS: record, CONFIG: ConfigRecord({"lr": 0.1})}), node, MessageType.TRAIN)
            for node, record in enumerate(records, start=1)]


@pytest.mark.parametrize("compute,messages,workers,expected", [
    ("cpu", 80, 2, [40, 40]), ("cpu", 80, 3, [27, 27, 26]), ("cpu", 4, 2, [2, 2]), ("cpu", 1, 2, [1]),
    ("cpu", 100, 1, [64, 36]), ("cuda", 80, 2, [64, 16]), ("cuda", 4, 2, [4])])
def test_vectorized_chunks_fill_the_cpu_threads_and_stay_whole_on_an_accelerator(monkeypatch, compute, messages,
                                                                                workers, expected):
    """On the CPU one call computes on one worker's cores: the round's clients are spread over the
    threads (at most K a call). On an accelerator a call takes up to K: one launch sequence for all."""
    import clients.batched
    from flwr.app import ArrayRecord

    from fl.specs import ClientSpec

    monkeypatch.setattr(clients.batched, "resolve_compute", lambda value: torch.device(value))
    batching = clients.batched.ClientBatching(ClientSpec(data=None, model=None, compute=compute), 64)
    record = ArrayRecord()
    chunks = batching.chunks(_train_messages([record] * messages), workers)
    assert [len(c) for c in chunks] == expected


def test_vectorized_chunks_keep_the_messages_of_one_vmap_side_by_side():
    import clients.batched
    from flwr.app import ArrayRecord

    from fl.message_keys import ARRAYS
    from fl.specs import ClientSpec

    a, b = ArrayRecord(), ArrayRecord()  # two received records: two vmap groups
    messages = _train_messages([a, b, a, b, a, b])
    chunks = clients.batched.ClientBatching(ClientSpec(data=None, model=None, compute="cpu"), 8).chunks(messages, 2)
    assert [[m.content[ARRAYS] is a for m in c] for c in chunks] == [[True] * 3, [False] * 3]


def test_engine_batch_clients_gives_the_sequential_delta_run(tmp_path, monkeypatch):
    """DELTA with four tiers: each tier's clients train as one vmap; model, metrics and bytes as sequential."""
    import clients.batched
    from fl.run_logger import read_metrics
    from tests.golden import TINY_DELTA
    from tests.helpers import run_inprocess

    calls = []
    vectorized = clients.batched.train_fused_vectorized

    def counted(model, receiveds, datas, *args):
        calls.append(len(datas))
        return vectorized(model, receiveds, datas, *args)

    monkeypatch.setattr(clients.batched, "train_fused_vectorized", counted)
    overrides = ["sim=delta_100clients", "num_clients=8", "fraction_fit=1.0", "rounds=2", "seed=2",
                 f"model.cache_dir={tmp_path}/cache", *TINY_DELTA, "data.partition.name=iid",
                 "~data.partition.classes_per_client"]  # equal sizes: a tier's clients share a step schedule
    _, seq_dir = run_inprocess(tmp_path / "seq", overrides)
    assert calls == []
    _, vec_dir = run_inprocess(tmp_path / "vec", overrides + ["engine.batch_clients=8"])
    _final_models_close(seq_dir, vec_dir)
    _rows_close(read_metrics(seq_dir), read_metrics(vec_dir))
    assert calls == [2] * 8  # each round, each of the four tiers' two clients as one vmap


@pytest.mark.parametrize("value,message", [
    (-1, "engine.batch_clients: must be >= 0, got -1"),
    (2.5, "engine.batch_clients: must be an integer, got 2.5"),
    ("'many'", "engine.batch_clients: must be an integer, got 'many'"),
])
def test_bad_batch_clients_is_one_line(tmp_path, value, message):
    from fl.config import build
    from fl.errors import ConfigError
    from tests.helpers import compose_config

    cfg = compose_config([f"engine.batch_clients={value}"])
    with pytest.raises(ConfigError) as err:
        build(cfg, str(tmp_path))
    assert str(err.value) == message


def test_batch_clients_on_ray_is_refused(tmp_path):
    from fl.config import build
    from fl.errors import ConfigError
    from tests.helpers import compose_config

    with pytest.raises(ConfigError, match=r"^engine.batch_clients: vectorized clients run on engine=inprocess only"):
        build(compose_config(["engine=ray", "engine.batch_clients=4"]), str(tmp_path))


def test_a_model_vectorized_clients_cannot_train_is_refused_with_the_config(tmp_path):
    """Dropout draws from the global stream: refused before any work, naming the key."""
    from fl.config import build
    from fl.errors import ConfigError
    from tests.helpers import SMALL, SMALL_SYNTHETIC, compose_config

    cfg = compose_config(SMALL + SMALL_SYNTHETIC + ["model=mobilenetv2_035", "engine.batch_clients=2"])
    with pytest.raises(ConfigError, match=r"^engine.batch_clients: model mobilenetv2_035: layer 'dropout' \(Dropout\)"):
        build(cfg, str(tmp_path))
    build(compose_config(SMALL + SMALL_SYNTHETIC + ["model=mobilenetv2_035", "engine.batch_clients=2",
                                                    "plugins=[update_norms]"]), str(tmp_path))  # not batched: accepted


# -- DELTA per tier: clients/delta_trainer.train_fused_vectorized ---------------------------------------------

def _delta_both_ways(train_edge, width, sizes=(40, 40, 33, 7)):
    from flwr.app import ConfigRecord

    from clients.delta_trainer import DeltaClientSettings, train_fused, train_fused_vectorized
    from fl.delta.network import FusedDelta
    from tests.test_delta_network import tiny_arch

    arch = tiny_arch(image_size=8, num_classes=3)
    tier = arch if width == 1.0 else arch.scaled(width)
    torch.manual_seed(0)
    model = FusedDelta(tier)
    for module in model.modules():  # BatchNorm statistics that differ from their initial values
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.8, 1.2)
    received = {k: v.clone() for k, v in model.state_dict().items()}
    s = DeltaClientSettings(arch.to_json(), width, True, 1, train_edge, fnc=0.1, sr=1e-3, val_fraction=0.0)
    config = ConfigRecord({"epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4})
    clients = _clients(sizes)
    sequential = []
    for data, g in zip(clients, _generators(len(clients))):
        model.load_state_dict(received)
        metrics = train_fused(model, data, config, s, g)
        sequential.append(({k: v.clone() for k, v in model.state_dict().items()}, metrics))
    vectorized = []
    for members in groups(clients, TrainHyper(epochs=2, batch_size=16), 1):
        states, metrics = train_fused_vectorized(FusedDelta(tier), [received] * len(members),
                                                 [clients[k] for k in members], config, s,
                                                 [_generators(len(clients))[k] for k in members])
        vectorized += [(k, state, m) for k, state, m in zip(members, states, metrics)]
    return sequential, [(state, m) for _, state, m in sorted(vectorized, key=lambda row: row[0])]


@pytest.mark.parametrize("train_edge,width", [(False, 1.0), (False, 0.5), (True, 1.0)],
                         ids=["delta", "narrow-tier", "edge-round"])
def test_delta_vectorized_equals_sequential(train_edge, width):
    """Every weight, buffer and metric of each client of a tier (frozen E and classifier; an edge
    round trains E too), with FNC and group-lasso terms, momentum and weight decay."""
    sequential, vectorized = _delta_both_ways(train_edge, width)
    worst = _max_relative_difference(sequential, vectorized)
    assert worst <= 1e-5, worst
    frozen = [k for k in sequential[0][0] if k.startswith("classifier.")]
    assert all(torch.equal(state[k], sequential[0][0][k]) for state, _ in vectorized for k in frozen)


def test_engine_batch_clients_gives_the_sequential_feddst_run(tmp_path, monkeypatch):
    """FedDST-like: outside readjustment rounds the clients train under the global mask as one
    vmap; a readjustment round (round 2 here) trains one client at a time. Model, metrics (mask
    Hamming distances included) and bytes as sequential; every upload keeps the mask."""
    import clients.batched
    from fl.run_logger import read_metrics
    from tests.helpers import run_inprocess

    calls = []
    vectorized = clients.batched.train_dense_vectorized

    def counted(model, received, datas, hyper, generators, masks=None):
        calls.append((len(datas), masks is not None))
        return vectorized(model, received, datas, hyper, generators, masks)

    monkeypatch.setattr(clients.batched, "train_dense_vectorized", counted)
    overrides = ["strategy=feddst", "seed=1", "rounds=3", "strategy.r_adj=2", "strategy.r_end=3",
                 "train.momentum=0.9", "num_clients=8", "fraction_fit=0.5", "data.partition.name=iid",
                 "~data.partition.classes_per_client"]  # equal sizes: one step schedule
    _, seq_dir = run_inprocess(tmp_path / "seq", overrides)
    _, vec_dir = run_inprocess(tmp_path / "vec", overrides + ["engine.batch_clients=4"])
    a, b = _final_models_close(seq_dir, vec_dir)
    assert all(torch.equal(a[k] == 0, b[k] == 0) for k in a if a[k].dim() >= 2)  # the same sparsity pattern
    _rows_close(read_metrics(seq_dir), read_metrics(vec_dir))
    assert calls and all(masked for _, masked in calls) and sum(n for n, _ in calls) == 2 * 4  # rounds 1 and 3
