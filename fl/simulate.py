"""``python -m fl.simulate [overrides]``: the Hydra entry point, a thin shell around ``fl.execute``.

Bad input stops here with one line ``error: <key>: <what is wrong>; <what to do>`` and exit
status 2, and no run directory is left: Hydra's own errors (an unknown option of a config group, an
unknown key, a malformed override, a YAML error in a config file, a run directory that cannot be
created) are caught by ``cli`` before the run starts; ours (``fl.config.build``, a plugin refusing
its options or the model before round 1) inside ``main``, which removes the directory Hydra made.

A run stops cleanly on SIGTERM or SIGINT (``fl.server.StopRequest``): the round in progress
finishes and is checkpointed, one line says ``stopped at round r; resume with: ...``, and the exit
status is 128 + the signal (143, 130). ``resume=<run dir>`` finishes any run that has a checkpoint,
writes the final outputs of one whose rounds are all done, and says so when a run is complete.
A completed run removes its ``checkpoint.pt`` unless ``keep_checkpoint=true``.
"""

from __future__ import annotations

import time

LAUNCHED_AT = time.time()  # noqa: E402  (first thing: the start-up benchmark measures from here)

import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fl.errors import ConfigError  # noqa: E402

CONFIG_FILE = "config.yaml"
_started = False  # set when Hydra hands over to main: an exception before that is bad input


@hydra.main(version_base="1.3", config_path="pkg://sim_configs", config_name="config")
def main(cfg: DictConfig) -> None:
    global _started
    _started = True
    run_dir = HydraConfig.get().runtime.output_dir
    import fl.config  # noqa: F401  (the heavy imports, after Hydra has parsed the command line)
    from fl.server import StopRequest

    if not cfg.get("verbose", False):  # after the imports: importing flwr resets its logger's level
        logging.getLogger("flwr").setLevel(logging.ERROR)

    task = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)  # as typed: ${...} unresolved
    overrides = [o for o in task if o.lstrip("+").partition("=")[0] != "resume"]
    with StopRequest().installed() as stop:
        _run(cfg, run_dir, stop, overrides)


def _run(cfg: DictConfig, run_dir: str, stop, overrides: list[str]) -> None:
    """Check the config (or the run to resume), run it, and turn what stops it into one line."""
    from fl.checkpoint import kill_point, remove_checkpoint
    from fl.config import build
    from fl.outputs import ERROR_FILE, atomic_write_text
    from fl.execute import execute
    from fl.server import RunStopped

    fresh_dir, resume = run_dir, None
    try:
        if cfg.get("resume"):
            resumed = resumed_run(str(cfg.resume), overrides)
            if resumed is None:  # complete already
                shutil.rmtree(fresh_dir, ignore_errors=True)
                return
            cfg, run_dir, resume = resumed
        server, engine, faults = build(cfg, run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        shutil.rmtree(fresh_dir, ignore_errors=True)
        sys.exit(2)
    except RunStopped as stopped:  # a second signal while the config was being checked
        shutil.rmtree(fresh_dir, ignore_errors=True)
        print("stopped before round 1; nothing was kept", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    if resume is None:
        atomic_write_text(Path(run_dir, CONFIG_FILE), OmegaConf.to_yaml(cfg, resolve=True))
    else:
        shutil.rmtree(fresh_dir, ignore_errors=True)
        Path(run_dir, ERROR_FILE).unlink(missing_ok=True)  # a failure this attempt may repair
        print(f"resuming {run_dir} after round {resume.round}", flush=True)
    print(start_lines(server), flush=True)
    try:
        summary = execute(server, engine, launched_at=LAUNCHED_AT, resume=resume, faults=faults, stop=stop)
    except RunStopped as stopped:
        _stopped(run_dir, stopped.round, stopped.signum, fresh=resume is None)
    except SystemExit as exc:  # Ray's own SIGTERM handler (ray.init installs it over ours) exits at once
        if exc.code != signal.SIGTERM or engine.name != "ray":
            Path(run_dir, ERROR_FILE).write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
            raise
        _stopped(run_dir, stop.checkpointed, signal.SIGTERM, fresh=resume is None)
    except ConfigError as exc:  # found once the run had started: a plugin's options or its check
        print(f"error: {exc}", file=sys.stderr)
        if resume is None and not _any_round_logged(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # bad input before round 1: no run folder
        else:
            Path(run_dir, ERROR_FILE).write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
        sys.exit(2)
    except BaseException as exc:
        Path(run_dir, ERROR_FILE).write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
        raise
    kill_point("finished")  # test hook: the outputs are written, the checkpoint not yet removed
    if not server.keep_checkpoint:
        remove_checkpoint(run_dir)
    strategy = getattr(server.make_strategy, "func", server.make_strategy).__name__
    print(f"done: {strategy} on {server.client.data.name}, {server.client.data.num_clients} clients, "
          f"{summary['rounds']} rounds, engine {engine.name}: accuracy {summary['final_accuracy']:.4f} "
          f"(best {summary['best_accuracy']:.4f}), up {summary['cum_up_bytes'] / 2**20:.2f} MiB, "
          f"down {summary['cum_down_bytes'] / 2**20:.2f} MiB, {summary['wall_s']:.1f} s -> {run_dir}")


def _stopped(run_dir: str, round: int, signum: int, *, fresh: bool) -> None:
    """The one line for a run stopped by a signal, and exit status 128 + the signal."""
    if round == 0 and fresh:  # nothing to resume: leave nothing behind
        shutil.rmtree(run_dir, ignore_errors=True)
        print("stopped before round 1 finished; nothing was kept (run it again to start over)", file=sys.stderr)
    else:
        print(f"stopped at round {round}; resume with: python -m fl.simulate resume={run_dir}", file=sys.stderr)
    sys.exit(128 + signum)


def resumed_run(run_dir: str, overrides: list[str] = ()):
    """The stored config, the run directory and its last complete checkpoint (ConfigError if none);
    None, after saying so, when the run is complete already. ``overrides`` (the command line's
    besides ``resume``) are refused: a resumed run is its stored config, or it would not be the same run."""
    from fl.checkpoint import load_checkpoint, remove_checkpoint
    from fl.outputs import outputs_complete

    path = Path(run_dir)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError("resume", f"{path} is not a run directory (no {CONFIG_FILE}); give the directory of a "
                                    "run started by python -m fl.simulate")
    if overrides:
        raise ConfigError("resume", f"a resumed run continues with its stored {CONFIG_FILE}; drop "
                                    f"{' '.join(overrides)} (or start a new run with them)")
    try:
        cfg = OmegaConf.load(path / CONFIG_FILE)
    except Exception as exc:
        raise ConfigError("resume", f"{path / CONFIG_FILE} is unreadable ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}); it is the run's "
                                    "configuration, restore it or start the run again") from None
    if outputs_complete(path):
        if cfg.get("keep_checkpoint") is False:  # killed between the final outputs and the clean-up
            remove_checkpoint(path)
        print(f"{path} is complete (final_model.pt and summary.json are written); nothing to resume")
        return None
    return cfg, str(path), load_checkpoint(path)


def start_lines(server) -> str:
    """Printed at start: the model's parameter and MAC counts (the data line is logged by fl.data)."""
    from fl.models import describe

    model = server.client.model
    federation = server.client.data.federation()  # built (and its partition logged) by fl.config
    return f"model: {describe(model.name, model.build_for(federation), in_channels=federation.channels, image_size=federation.image_size)}"


def _any_round_logged(run_dir: str) -> bool:
    from fl.run_logger import METRICS_FILE

    metrics = Path(run_dir, METRICS_FILE)
    return metrics.is_file() and bool(metrics.read_text(encoding="utf-8").strip())


# -- the command line: Hydra's errors as one line ---------------------------------------------------

def cli(argv: list[str] | None = None) -> None:
    """``python -m fl.simulate``: runs ``main``; an error Hydra raises before the run starts (bad
    command line, bad config file, unusable run directory) becomes one line and exit status 2."""
    global _started
    _started = False
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing its own report
    try:
        _check_flags(sys.argv[1:])
        main()
    except Exception as exc:
        from hydra.errors import HydraException

        # The run's own failure (main wrote error.txt; the traceback is the report), unless Hydra
        # found a bad input while composing a later job of a -m sweep.
        if _started and not isinstance(exc, HydraException):
            raise
        print(f"error: {hydra_error(exc, sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before main installed its handlers (while Python and Hydra start)
        print("stopped before round 1; nothing was kept", file=sys.stderr)
        sys.exit(130)
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env


def _check_flags(args: list[str]) -> None:
    """Hydra's command-line parser (argparse) on ``args``: its errors (an unknown option, an option
    after the overrides) as one line and exit 2 instead of a usage text."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:
        print(f"error: command line: {message}; options such as -m and --config-dir go before the overrides "
              "(python -m fl.simulate --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    parser.parse_args(args)


def hydra_error(exc: BaseException, args: list[str]) -> str:
    """``<key>: <what is wrong>; <what to do>`` for an exception Hydra raised before the run."""
    import yaml
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    cause = exc.__cause__ or exc.__context__
    yaml_error = next((e for e in (exc, cause) if isinstance(e, yaml.MarkedYAMLError)), None)
    if yaml_error is not None and yaml_error.problem_mark is not None:
        mark = yaml_error.problem_mark
        return (f"{mark.name}:{mark.line + 1}: YAML syntax error at column {mark.column + 1}: "
                f"{yaml_error.problem}; fix that line of the file")
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        if not group:
            return f"--config-name: no config {option!r}; the shipped one is 'config'"
        options = exc.options if exc.options is not None else _group_options(group)
        return f"{group}: unknown option {option!r}; allowed: {', '.join(options)}"
    if isinstance(exc, ConfigCompositionException) and isinstance(cause, OmegaConfBaseException) \
            and getattr(cause, "full_key", None):
        key = cause.full_key
        parent = getattr(cause, "parent_node", None)
        if "not in struct" in str(cause) and parent is not None:
            where = key.rpartition(".")[0] or "the config"
            if where == "plugins":  # options of a plugin the command did not choose
                name = key.partition(".")[2]
                return (f"{key}: plugin {name!r} is not chosen; add plugins=[{name}] (or list it with the others) "
                        f"to set its options; plugins: {', '.join(_group_options('plugins'))}")
            keys = [str(k) for k in parent if k != "hydra"]
            return f"{key}: unknown key; {where} takes: {', '.join(keys)}"
        return f"{key}: {str(cause).splitlines()[0]}; see python -m fl.simulate --cfg job for every key"
    if isinstance(exc, ConfigCompositionException):
        first = str(exc).splitlines()[0].rstrip(".")
        quoted = first.split("'")
        key = quoted[1] if len(quoted) > 2 else "overrides"
        return f"{key}: {first}; see python -m fl.simulate --cfg job for every key"
    if isinstance(exc, OverrideParseException):
        bad = _malformed_override(args) or "overrides"
        reason = str(exc).splitlines()[0]
        return f"{bad}: malformed override ({reason}); write key=value, e.g. rounds=5 or 'train.lr=0.01'"
    if isinstance(exc, OSError) and exc.filename is not None:
        key = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in args) else "hydra.run.dir"
        return (f"{key}: cannot create the run directory {exc.filename} ({exc.strerror}); "
                f"choose a writable directory, e.g. {key}=runs/my_run")
    what = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
    if "config directory" in what:  # e.g. --config-dir=/nonexistent
        return f"--config-dir: {what}; give a directory that holds config groups (strategy/, data/, ...)"
    keyless = next((a for a in args if a.lstrip("+~").startswith("=")), None)
    if keyless is not None:
        return f"{keyless}: an override needs a key before '='; write key=value, e.g. rounds=5"
    culprit = _group_override(args)
    if culprit is not None:  # e.g. plugins=5: a config group takes an option name (or a list of them)
        group, value = culprit
        return f"{group}: {value!r} is not an option of the config group ({what}); allowed: " \
               f"{', '.join(_group_options(group))}"
    return f"overrides: {what}; see python -m fl.simulate --help"


def _malformed_override(args: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            parser.parse_override(arg)
        except Exception:
            return arg
    return None


def _group_override(args: list[str]) -> tuple[str, str] | None:
    """The first ``group=value`` override whose value is no option name (a number, an empty group)."""
    for arg in args:
        key, eq, value = arg.lstrip("+~").partition("=")
        if eq and key and _group_options(key) and not (value.isidentifier() or value.startswith("[")):
            return key, value
    return None


def _group_options(group: str) -> list[str]:
    import sim_configs

    return sorted(p.stem for p in (Path(sim_configs.__file__).parent / group).glob("*.yaml"))


if __name__ == "__main__":
    cli()
