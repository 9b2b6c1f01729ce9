"""Every bad input is one line ``error: <key>: ...``, exit status 2, no traceback and no run folder
(issue 19, item 2), whether Hydra finds it (an unknown config-group option, an unknown key, a
malformed override, a YAML error in a user's config file, an unusable run directory) or the run's
own checks do (a value out of range, a key the run would ignore, a plugin refusing its options).

The table runs ``fl.simulate.cli`` in this process (what ``python -m fl.simulate`` calls, with the
same argv); a few cases also run as a subprocess to check the real command line.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_cli

# Small enough that a case that wrongly starts the run finishes in seconds.
BASE = ["num_clients=4", "rounds=1", "fraction_fit=0.5", "progress=false", "data.samples_per_client=8",
        "data.test_size=32"]

CASES = [  # (overrides, the key the error line names, a fragment of the line)
    # Hydra's own errors
    (["strategy=nosuch"], "strategy", "allowed: agilenn, delta, fedavg"),
    (["data=nosuch"], "data", "allowed: cifar10"),
    (["sim=nosuch"], "sim", "allowed: compare_sparse"),
    (["plugins=[nosuch]"], "plugins", "allowed: agilenn, compression"),
    (["plugins=5"], "plugins", "allowed: agilenn, compression"),
    (["train.learning_rate=0.1"], "train.learning_rate", "unknown key; train takes: epochs, batch_size, lr"),
    (["learning_rate=0.1"], "learning_rate", "unknown key"),
    (["rounds=[1"], "rounds=[1", "malformed override"),
    (["rounds"], "rounds", "malformed override"),
    (["=3"], "=3", "needs a key"),
    (["+rounds=3"], "rounds", "already"),
    (["~nosuch"], "nosuch", "does not exist"),
    (["--config-name=nosuch"], "--config-name", "no config 'nosuch'"),
    (["--config-dir=/nonexistent/configs"], "--config-dir", "not found"),
    (["-m", "strategy=fedavg,nosuch", "rounds=0"], "strategy", "unknown option 'nosuch'"),
    (["hydra.job.chdir=maybe"], "hydra.job.chdir", "not a valid bool"),
    # keys the run would ignore
    (["+foo=1"], "foo", "unknown key; the run reads: seed"),
    (["plugins.compression.structured_ratio=0.3"], "plugins.compression",
     "plugin 'compression' is not chosen; add plugins=[compression]"),
    (["+train.learning_rate=0.1"], "train.learning_rate", "unknown key; train takes"),
    (["+ray.cpus=2"], "ray.cpus", "unknown key; ray takes: address, num_cpus_per_client"),
    (["+strategy.nosuch=1"], "strategy.nosuch", "takes no argument"),
    # values
    (["round_timeout=abc"], "round_timeout", "must be a number"),
    (["round_timeout=-5"], "round_timeout", "must be > 0"),
    (["round_timeout=0"], "round_timeout", "must be > 0"),
    (["ray.num_cpus_per_client=abc"], "ray.num_cpus_per_client", "must be a number"),
    (["ray.num_cpus_per_client=0"], "ray.num_cpus_per_client", "must be > 0"),
    (["ray.address=5"], "ray.address", "host:port"),
    (["num_clients=1000000000"], "num_clients", "lower num_clients"),
    (["num_clients=0"], "num_clients", "must be >= 1"),
    (["rounds=0"], "rounds", "must be >= 1"),
    (["rounds=abc"], "rounds", "must be an integer"),
    (["rounds=2.5"], "rounds", "must be an integer"),
    (["rounds=${nosuch}"], "rounds", "nosuch"),
    (["seed=-1"], "seed", "must be >= 0"),
    (["fraction_fit=1.5"], "fraction_fit", "(0, 1]"),
    (["min_fit_clients=50"], "min_fit_clients", "raise num_clients"),
    (["train.lr=-1"], "train.lr", "must be >= 0"),
    (["train.lr=nan"], "train.lr", "finite"),
    (["train.epochs=0"], "train.epochs", "must be >= 1"),
    (["train.bn_stats=nope"], "train.bn_stats", "allowed: global"),
    (["codec.up=nope"], "codec.up", "allowed:"),
    (["strategy=hermes", "codec.up=topk_0.1"], "codec.up", "sends slice payloads"),
    (["strategy=feddst", "codec.down=channel_slice_fp16"], "codec.down", "sends bitmap payloads"),
    (["codec.down=topk_0.1"], "codec.down", "codec.up only"),
    (["engine.name=nope"], "engine.name", "allowed: inprocess, ray"),
    (["engine.workers=0"], "engine.workers", "must be >= 1"),
    (["ray.num_gpus_per_client=1.5"], "ray.num_gpus_per_client", "(0, 1]"),
    (["ray.num_gpus_per_client=-1"], "ray.num_gpus_per_client", "must be >= 0"),
    (["engine=ray", "ray.address=127.0.0.1:1"], "ray.address", "cannot reach a Ray cluster"),
    (["engine=ray", "ray.address=headnode"], "ray.address", "host:port"),
    (["faults.crash=2"], "faults.crash", "[0, 1]"),
    (["checkpoint_every=-1"], "checkpoint_every", "must be >= 0"),
    (["eval_every=abc"], "eval_every", "must be an integer"),
    (["tensorboard=maybe"], "tensorboard", "true or false"),
    (["keep_checkpoint=abc"], "keep_checkpoint", "true or false"),
    (["model.name=nope"], "model.name", "allowed: "),
    (["data.samples_per_client=0"], "data.samples_per_client", "must be >= 1"),
    (["data.partition.name=nope"], "data.partition.name", "allowed: dirichlet, iid, shards"),
    (["strategy=feddst", "strategy.sparsity=1.5"], "strategy.sparsity", ""),
    (["resume=/nonexistent/run"], "resume", "not a run directory"),
    (["resume=tests"], "resume", "not a run directory"),
    # plugins: refused before round 1, by their constructor or their run-start check
    (["plugins=[update_norms]", "+plugins.update_norms.nosuch=1"], "plugins.update_norms", "it takes: per_layer"),
    (["plugins=[geometry]", "plugins.geometry.samples=0"], "plugins.geometry", ">= 1"),
    (["plugins=[compression]", "plugins.compression.structured_ratio=1.5"], "plugins.compression", "[0, 1)"),
    (["plugins=[xdelta]"], "plugins", "model=delta"),
    (["plugins=[geometry]", "plugins.geometry.clients=[99]"], "plugins.geometry", "not partitions"),
    (["device.deadline_s=abc"], "device.deadline_s", "must be a number"),
    (["device.deadline_s=5"], "device.deadline_s", "device=edge_mix"),
    (["device=edge_mix", "device.deadline_s=-1"], "device.deadline_s", "must be > 0"),
    (["device.profiles=5"], "device.profiles", "list"),
    # an option of the wrong type for the dataset's, model's or plugin's declared parameter
    (["data.difficulty=abc"], "data.difficulty", "must be a number"),
    (["+model.width=abc"], "model.width", "must be a number"),
    (["+model.hidden=2.5"], "model.hidden", "must be an integer"),
    (["plugins=[geometry]", "plugins.geometry.every=abc"], "plugins.geometry.every", "must be an integer"),
    (["plugins=[update_norms]", "plugins.update_norms.per_layer=maybe"], "plugins.update_norms.per_layer",
     "true or false"),
]


def _one_error_line(text: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def _cli_in_process(args: list[str], capfd) -> tuple[int, str]:
    from fl.simulate import cli

    with pytest.raises(SystemExit) as exited:
        cli(args)
    out, err = capfd.readouterr()
    assert _one_error_line(out + err) in err  # on stderr, and nothing else says "error:"
    return exited.value.code, err


@pytest.mark.parametrize("overrides,key,fragment", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_run_folder(tmp_path, capfd, overrides, key, fragment):
    run_dir = tmp_path / "run"
    flags = [a for a in overrides if a.startswith("-")]  # Hydra's options go before the overrides
    code, err = _cli_in_process([*flags, *BASE, *[a for a in overrides if a not in flags],
                                 f"hydra.run.dir={run_dir}"], capfd)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith(f"error: {key}: "), line
    assert fragment in line, line
    assert not run_dir.exists()


def test_yaml_error_in_a_users_config_file_names_the_file_and_line(tmp_path, capfd):
    config_dir = tmp_path / "my_configs"
    (config_dir / "strategy").mkdir(parents=True)
    bad = config_dir / "strategy" / "mine.yaml"
    bad.write_text("name: fedavg\nserver_momentum: [0.5\nlr: 1\n")
    run_dir = tmp_path / "run"
    code, err = _cli_in_process([f"--config-dir={config_dir}", "strategy=mine", *BASE, f"hydra.run.dir={run_dir}"],
                                capfd)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith(f"error: {bad}:3: YAML syntax error"), line
    assert not run_dir.exists()


@pytest.mark.parametrize("args,fragment", [
    (["rounds=1", "-m", "strategy=fedavg,feddst"], "unrecognized arguments"),
    (["--nosuch"], "unrecognized arguments: --nosuch"),
    (["--cfg", "nosuch"], "invalid choice"),
])
def test_hydras_command_line_parser_errors_are_one_line(tmp_path, capfd, args, fragment):
    code, err = _cli_in_process([*args, f"hydra.run.dir={tmp_path / 'run'}"], capfd)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("error: command line: ") and fragment in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["under_a_file", "a_file", "under_proc"])
def test_a_run_directory_that_cannot_be_created(tmp_path, capfd, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    run_dir = {"under_a_file": a_file / "run", "a_file": a_file, "under_proc": "/proc/fl_simulate_run"}[where]
    code, err = _cli_in_process([*BASE, f"hydra.run.dir={run_dir}"], capfd)
    assert code == 2
    assert _one_error_line(err).startswith(f"error: hydra.run.dir: cannot create the run directory {run_dir}")


def test_resume_with_other_overrides_is_refused_and_changes_nothing(tmp_path, capfd):
    """A resumed run is its stored config: an override beside resume= would be ignored, so it is refused."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("rounds: 3\n")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "final_model.pt").write_bytes(b"x")
    (run_dir / "checkpoint.pt").write_bytes(b"x")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir())
    code, err = _cli_in_process([f"resume={run_dir}", "rounds=10", f"hydra.run.dir={tmp_path / 'fresh'}"], capfd)
    assert code == 2
    assert _one_error_line(err).startswith("error: resume: a resumed run continues with its stored config.yaml; "
                                           "drop rounds=10")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir()) == before
    assert not (tmp_path / "fresh").exists()


def test_resume_of_a_torn_config_is_one_line(tmp_path, capfd):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\nnum_clients: [4\n")
    code, err = _cli_in_process([f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'fresh'}"], capfd)
    assert code == 2
    assert _one_error_line(err).startswith(f"error: resume: {run_dir / 'config.yaml'} is unreadable")


def test_the_stopped_hydra_errors_leave_the_process_as_it_was(tmp_path, capfd):
    """cli() restores argv, HYDRA_FULL_ERROR and the signal handlers it changed (in-process callers)."""
    import os
    import signal
    import sys

    before = (list(sys.argv), os.environ.get("HYDRA_FULL_ERROR"), signal.getsignal(signal.SIGINT),
              signal.getsignal(signal.SIGTERM))
    _cli_in_process([*BASE, "round_timeout=-5", f"hydra.run.dir={tmp_path / 'run'}"], capfd)
    assert (sys.argv, os.environ.get("HYDRA_FULL_ERROR"), signal.getsignal(signal.SIGINT),
            signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("overrides,key", [
    (["train.learning_rate=0.1"], "train.learning_rate"),
    (["round_timeout=abc"], "round_timeout"),
    (["plugins=[xdelta]"], "plugins"),
])
def test_the_command_line_itself(tmp_path, overrides, key):
    run_dir = tmp_path / "run"
    result = run_cli([*BASE, *overrides, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert _one_error_line(result.stdout + result.stderr).startswith(f"error: {key}: ")
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: a local Ray may reserve it")
def test_a_gpu_share_for_a_local_ray_without_a_gpu_is_one_line(tmp_path, capfd):
    code, err = _cli_in_process([*BASE, "engine=ray", "ray.num_gpus_per_client=0.5", f"hydra.run.dir={tmp_path / 'run'}"],
                                capfd)
    assert code == 2 and _one_error_line(err).startswith("error: ray.num_gpus_per_client: 0.5 asks for a GPU")
    assert not (tmp_path / "run").exists()
