"""The ``compute`` key (fl/compute.py): how each value resolves, the one-line errors for a device
that is not there, ``compute=cpu`` equal to the default bit for bit on a CPU machine, and that
the trainers, central evaluation and the plugins' view use the resolved device.

No test here needs a GPU: a machine with CUDA is faked by patching ``torch.cuda``'s queries, and
the device the code places models on is observed through a marker device (``cpu:0``, which is a
distinct ``torch.device`` from ``cpu`` although tensors on it are CPU tensors) and a spy on
``nn.Module.to``.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

import fl.compute
from fl.compute import CPU, all_to_cpu, model_device, one_copy, placed, resolve_compute, to_cpu
from fl.errors import ConfigError
from fl.hooks import Plugin
from fl.run_logger import read_metrics
from tests.golden import is_timing, model_hash
from tests.helpers import ROOT, run_cli, run_inprocess

MARKER = torch.device("cpu", 0)  # what the patched resolution returns: a device no code uses by itself
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error cases need none")


@pytest.fixture(autouse=True)
def _fresh_resolution():
    """``resolve_compute`` caches per process; each test resolves against its own (faked) machine."""
    fl.compute._resolve.cache_clear()
    yield
    fl.compute._resolve.cache_clear()


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# -- resolution of each value ------------------------------------------------------------------------

def test_auto_is_cuda_where_torch_sees_a_gpu_else_cpu(monkeypatch):
    assert resolve_compute("auto") == (torch.device("cuda") if torch.cuda.is_available() else CPU)
    fl.compute._resolve.cache_clear()
    _fake_gpus(monkeypatch, 0)
    assert resolve_compute("auto") == CPU
    fl.compute._resolve.cache_clear()
    _fake_gpus(monkeypatch, 2)
    assert resolve_compute("auto") == torch.device("cuda")


def test_cpu_cuda_and_cuda_n_on_a_machine_with_two_gpus(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    assert resolve_compute("cpu") == CPU
    assert resolve_compute("cuda") == torch.device("cuda")
    assert resolve_compute("cuda:1") == torch.device("cuda", 1)
    assert resolve_compute(" CUDA:0 ") == torch.device("cuda", 0)  # written loosely, read as meant
    with pytest.raises(ConfigError, match=r"^compute: cuda:2: there is no GPU 2, this machine has 2 \(cuda:0 to cuda:1\)"):
        resolve_compute("cuda:2")


@pytest.mark.parametrize("value,fragment", [
    ("gpu", "unknown value 'gpu'; allowed: auto, cpu, cuda, cuda:N"),
    ("cuda:-1", "unknown value 'cuda:-1'"),
    ("cuda:x", "unknown value 'cuda:x'"),
    (0, "must be one of auto, cpu, cuda, cuda:N, got 0"),
    (None, "must be one of auto, cpu, cuda, cuda:N, got None"),
])
def test_a_value_that_names_no_device_is_refused(value, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_compute(value)
    assert str(err.value).startswith("compute: ") and fragment in str(err.value)


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_says_what_to_do(monkeypatch, value):
    _fake_gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match=rf"^compute: {value} asks for a CUDA GPU but torch finds none .* "
                                          r"set compute=cpu or compute=auto, or run where a GPU is$"):
        resolve_compute(value)


def test_the_cpu_helpers_are_the_identity_on_the_cpu():
    model = nn.Linear(3, 2)
    state = model.state_dict()
    assert all(to_cpu(state)[k].data_ptr() == state[k].data_ptr() for k in state)  # no copy
    other = nn.Linear(3, 2).state_dict()
    both = all_to_cpu([state, other])
    assert [list(s) for s in both] == [list(state), list(other)]
    assert all(both[1][k].data_ptr() == other[k].data_ptr() for k in other)
    assert model_device(model) == CPU and model_device(nn.ReLU()) == CPU
    weight = model.weight
    with placed(model, CPU):
        assert model.weight is weight
    assert model.weight is weight


def test_one_copy_moves_each_dtype_group_in_one_transfer_and_keeps_values_shapes_and_order():
    """What ``to_cpu`` does with a state on an accelerator, exercised here on CPU tensors."""
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7),
             "conv.bias": torch.randn(4), "mask": torch.rand(5) > 0.5, "bn.running_mean": torch.randn(4),
             "steps": torch.arange(6).reshape(2, 3)}
    copied = one_copy(state)
    assert list(copied) == list(state)
    for name, tensor in state.items():
        assert copied[name].dtype == tensor.dtype and copied[name].shape == tensor.shape
        assert torch.equal(copied[name], tensor) and copied[name].data_ptr() != tensor.data_ptr()
    storage = lambda name: copied[name].untyped_storage().data_ptr()  # noqa: E731
    assert storage("conv.weight") == storage("conv.bias") == storage("bn.running_mean")  # one float32 copy
    assert storage("bn.num_batches_tracked") == storage("steps") != storage("conv.weight")  # one int64 copy
    assert one_copy({}) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: copies a state from the GPU")
def test_to_cpu_brings_a_gpu_state_to_the_host_with_its_values():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).cuda()
    state = model.state_dict()
    host = to_cpu(state)
    assert list(host) == list(state)
    assert all(host[k].device == CPU and torch.equal(host[k], state[k].cpu()) for k in state)


# -- the command lines: one error line, exit 2, nothing written -----------------------------------------

BASE = ["num_clients=4", "rounds=1", "fraction_fit=0.5", "progress=false", "data.samples_per_client=8",
        "data.test_size=32"]


def _error_line(text: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


@NO_CUDA
def test_simulate_with_compute_cuda_and_no_cuda_is_one_line_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*BASE, "compute=cuda", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert _error_line(result.stdout + result.stderr).startswith("error: compute: cuda asks for a CUDA GPU")
    assert not run_dir.exists()


@pytest.mark.parametrize("value,fragment", [("gpu", "unknown value 'gpu'"),
                                            pytest.param("cuda:1", "asks for a CUDA GPU", marks=NO_CUDA)])
def test_simulate_refuses_a_bad_compute_in_process(tmp_path, capfd, value, fragment):
    from fl.simulate import cli

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        cli([*BASE, f"compute={value}", f"hydra.run.dir={run_dir}"])
    _, err = capfd.readouterr()
    assert exited.value.code == 2
    line = _error_line(err)
    assert line.startswith("error: compute: ") and fragment in line, line
    assert not run_dir.exists()


def test_explain_and_pretrain_refuse_a_bad_compute(tmp_path, capsys):
    from fl.delta.pretrain import main as pretrain
    from fl.explain import main as explain

    assert explain(["--pair-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--compute", "gpu"]) == 2
    assert _error_line(capsys.readouterr().err).startswith("error: --compute: unknown value 'gpu'")
    assert not (tmp_path / "out").exists()
    assert pretrain(["model=delta", "compute=gpu", f"model.cache_dir={tmp_path / 'cache'}"]) == 2
    assert _error_line(capsys.readouterr().err).startswith("error: compute: unknown value 'gpu'")
    assert not (tmp_path / "cache").exists()


def test_a_supernodes_compute_replaces_the_runs(monkeypatch):
    from fl.deploy.device import DeviceSettings, device_run
    from fl.deploy.run_config import OVERRIDES

    tiny = "num_clients=2 data.samples_per_client=8 data.test_size=16"
    assert DeviceSettings.from_node_config({"compute": "cpu"}).compute == "cpu"
    with pytest.raises(ConfigError, match="^node-config compute: unknown value 'tpu'"):
        DeviceSettings.from_node_config({"compute": "tpu"})
    assert device_run({OVERRIDES: tiny}, DeviceSettings()).client.compute == "auto"  # default: auto on the node
    _fake_gpus(monkeypatch, 0)  # a run config asking for CUDA, on a node without it
    assert device_run({OVERRIDES: f"{tiny} compute=cuda"}, DeviceSettings(compute="cpu")).client.compute == "cpu"
    with pytest.raises(ConfigError, match="^compute: cuda asks for a CUDA GPU"):
        device_run({OVERRIDES: f"{tiny} compute=cuda seed=1"}, DeviceSettings())


# -- compute=cpu is the default, bit for bit; bytes are counted from CPU tensors ---------------------------

class BytesUp(Plugin):
    """Records each client's upload, as the ClientApp hands it to Flower (the bytes counted)."""

    sent: list[tuple[int, int, int]] = []

    def on_payload(self, client, record):
        BytesUp.sent.append((client.server_round, client.partition_id, record.count_bytes()))
        return record


def _run(tmp_path, overrides):
    BytesUp.sent = []
    summary, run_dir = run_inprocess(tmp_path, [*overrides, "+plugins.bytes_up._target_=tests.test_compute.BytesUp"])
    rows = [{k: v for k, v in row.items() if not is_timing(k)} for row in read_metrics(run_dir)]
    return model_hash(run_dir / "final_model.pt"), rows, sorted(BytesUp.sent)


@pytest.mark.parametrize("strategy", ["fedavg", "feddst", "hermes"])
def test_compute_cpu_gives_the_default_runs_final_model_bit_for_bit(tmp_path, strategy):
    default = _run(tmp_path / "default", [f"strategy={strategy}"])
    on_cpu = _run(tmp_path / "cpu", [f"strategy={strategy}", "compute=cpu"])
    assert on_cpu[0] == default[0]  # the final model's hash
    assert on_cpu[1] == default[1]  # every logged row but its timings: accuracy, bytes up and down
    assert on_cpu[2] == default[2] and default[2]  # each client's upload, byte for byte
    saved = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    assert saved["status"] == "complete"
    assert saved["peak_gpu_bytes"] is None  # no CUDA device was used


def test_peak_accelerator_memory_sums_the_devices_this_process_used(monkeypatch):
    from fl.compute import peak_accelerator_memory

    _fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert peak_accelerator_memory() is None  # CUDA present, never touched
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 1000 * (index + 1))
    assert peak_accelerator_memory() == 3000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: compares a CUDA run with a CPU run")
@pytest.mark.parametrize("overrides", [["strategy=fedavg"], ["strategy=feddst"], "delta"], ids=["fedavg", "feddst", "delta"])
def test_a_cuda_run_counts_the_cpu_runs_bytes_client_by_client(tmp_path, overrides):
    """The same run on the GPU and on the CPU: every client's upload and every round's traffic in
    bytes are identical (payloads are encoded from CPU tensors); accuracy agrees within float noise."""
    if overrides == "delta":
        from tests.golden import TINY_DELTA

        overrides = ["sim=delta_100clients", "num_clients=8", "fraction_fit=0.5", f"model.cache_dir={tmp_path}/cache",
                     *TINY_DELTA]
    cpu = _run(tmp_path / "cpu", [*overrides, "compute=cpu"])
    gpu = _run(tmp_path / "gpu", [*overrides, "compute=cuda"])
    assert gpu[2] == cpu[2]  # (round, partition, upload bytes) of every client
    bytes_of = lambda rows: [(r["round"], r["up_bytes"], r["down_bytes"], r["clients"]) for r in rows]  # noqa: E731
    assert bytes_of(gpu[1]) == bytes_of(cpu[1])
    assert abs(gpu[1][-1]["accuracy"] - cpu[1][-1]["accuracy"]) <= 0.1


def test_a_run_trained_on_a_gpu_exports_on_a_machine_without_one(tmp_path, monkeypatch):
    """fl.export rebuilds the run's model with compute=cpu and loads its weights with map_location."""
    from fl.export import load_run

    _, run_dir = run_inprocess(tmp_path, [])
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("compute: auto", "compute: cuda:1"))
    _fake_gpus(monkeypatch, 0)
    model, info = load_run(run_dir)
    saved = torch.load(run_dir / "final_model.pt", map_location="cpu")
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved) and info["name"] == "cnn_small"


# -- the trainers, central evaluation and the plugins' view use the resolved device ----------------------

class DeviceSpy(Plugin):
    """Client side: the model each local training runs with; server side: the run's device."""

    trained: list[nn.Module] = []
    run_devices: list[torch.device] = []

    def before_train(self, client, model, config):
        DeviceSpy.trained.append(model)

    def after_aggregate(self, run, server_round, arrays):
        DeviceSpy.run_devices.append(run.device)


@pytest.fixture
def moved_to_marker(monkeypatch):
    """Every compute key resolves to MARKER; returns the modules ``.to(MARKER)`` was called on."""
    import clients.resident
    import clients.trainer
    import fl.config
    import fl.server

    monkeypatch.setattr(clients.resident, "_pools", {})  # no resident model from an earlier test
    for module in (clients.trainer, fl.server, fl.config):
        monkeypatch.setattr(module, "resolve_compute", lambda value, key="compute": MARKER)
    moved: list[nn.Module] = []
    original = nn.Module.to

    def spy(self, *args, **kwargs):
        if any(isinstance(a, torch.device) and a == MARKER for a in (*args, *kwargs.values())):
            moved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    DeviceSpy.trained, DeviceSpy.run_devices = [], []
    return moved


SPY = "+plugins.device_spy._target_=tests.test_compute.DeviceSpy"


@pytest.mark.parametrize("overrides", [
    ["strategy=fedavg"], ["strategy=feddst"], ["strategy=hermes"],
    ["plugins=[agilenn]", "model.channels=8", "strategy.pretrain_rounds=1", "plugins.agilenn.samples=16",
     "plugins.agilenn.captum_samples=0"],
], ids=["fedavg", "feddst", "hermes", "agilenn"])
def test_every_trainer_trains_a_model_placed_on_the_resolved_device(tmp_path, moved_to_marker, overrides):
    run_inprocess(tmp_path, [*overrides, SPY])
    assert DeviceSpy.trained, "no local training ran"
    moved = {id(m) for m in moved_to_marker}
    assert all(id(model) in moved for model in DeviceSpy.trained)  # each trained model was placed on it
    assert all(model_device(model).type == MARKER.type for model in DeviceSpy.trained)  # and its parameters are there
    assert DeviceSpy.run_devices and set(DeviceSpy.run_devices) == {MARKER}  # the plugins' RunView.device


def test_central_evaluation_places_its_model_on_the_resolved_device(tmp_path, moved_to_marker, monkeypatch):
    import fl.server

    built = []
    original = fl.server.CentralEvaluation.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self.model)

    monkeypatch.setattr(fl.server.CentralEvaluation, "__init__", init)
    run_inprocess(tmp_path, ["strategy=fedavg"])
    assert built and all(any(m is model for m in moved_to_marker) for model in built)


def test_vectorized_clients_train_on_the_resolved_device(tmp_path, moved_to_marker, monkeypatch):
    import clients.batched

    used = []
    original = clients.batched.train_dense_vectorized

    def spy(model, *args, **kwargs):
        used.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(clients.batched, "train_dense_vectorized", spy)
    run_inprocess(tmp_path, ["strategy=fedavg", "engine.batch_clients=4"])
    assert used and all(any(m is model for m in moved_to_marker) for model in used)


def _templates(monkeypatch, cls) -> list:
    """The server-side models (``template``) of every ``cls`` strategy built from now on."""
    templates = []
    original = cls.__init__

    @functools.wraps(original)  # the config builder reads the constructor's parameters
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        templates.append(self.template)

    monkeypatch.setattr(cls, "__init__", init)
    return templates


def test_the_delta_trainer_and_strategy_use_the_resolved_device(tmp_path, moved_to_marker, monkeypatch):
    from strategies.delta import DeltaFactorized
    from tests.golden import TINY_DELTA

    templates = _templates(monkeypatch, DeltaFactorized)
    run_inprocess(tmp_path / "run", ["sim=delta_100clients", "num_clients=4", "fraction_fit=0.5", "rounds=1",
                                     "strategy.tier_eval_every=1", f"model.cache_dir={tmp_path}/cache", *TINY_DELTA,
                                     SPY])
    moved = {id(m) for m in moved_to_marker}
    assert DeviceSpy.trained and all(id(model) in moved for model in DeviceSpy.trained)
    assert templates and all(id(t) in moved for t in templates)  # the tier accuracies' model


def test_agilenn_split_learning_trains_the_remote_head_on_the_resolved_device(tmp_path, moved_to_marker, monkeypatch):
    from strategies.agilenn import AgileNN

    templates = _templates(monkeypatch, AgileNN)
    run_inprocess(tmp_path, ["plugins=[agilenn]", "model.channels=8", "strategy.pretrain_rounds=1",
                             "strategy.remote=split", "plugins.agilenn.samples=16", "plugins.agilenn.captum_samples=0",
                             "rounds=2", SPY])
    moved = {id(m) for m in moved_to_marker}
    assert templates and all(id(t) in moved for t in templates)
    assert DeviceSpy.trained and all(id(model) in moved for model in DeviceSpy.trained)


def test_the_module_docstring_explains_the_choice():
    doc = fl.compute.__doc__
    for needed in ("compute=auto", "compute=cpu", "compute=cuda:N", "device=", "to_cpu", "bit-identical",
                   "node-config compute", "map_location"):
        assert needed in doc, needed
    assert (ROOT / "docs" / "configuration.md").read_text().count("| `compute` | `auto` |") == 1
