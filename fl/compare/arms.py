"""The arms of a comparison preset and running each as its own ``python -m fl.simulate`` process.

A preset (``sim_configs/sim/<name>.yaml``) names its arms as the one sweep parameter of its
``hydra.sweeper.params`` (``sim=delta_compare``: ``+arm: delta,fedavg_edge,...``;
``sim=compare_sparse``: ``strategy: fedavg,hermes,feddst``), so ``python -m fl.simulate -m sim=<name>``
and ``python -m fl.compare --sim <name>`` run the same arms. Every arm and the user's overrides are
composed with Hydra before anything runs, so an unknown arm, key or malformed override stops the
comparison with one line before the first run. Each arm runs in a process of its own, one after
the other, into ``<out>/<i>_<arm>``; its output passes through, except its own ``error: ...`` line,
which becomes part of the comparison's single error line.
"""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence, TextIO

from fl.errors import ConfigError

CONFIG_MODULE = "sim_configs"


@dataclass(frozen=True)
class Arm:
    """One arm: its name (e.g. ``delta``) and the override that selects it (e.g. ``+arm=delta``)."""

    name: str
    key: str

    @property
    def override(self) -> str:
        return f"{self.key}={self.name}"


class ArmFailed(Exception):
    """An arm's run did not complete: its exit status and its error line."""

    def __init__(self, arm: Arm, returncode: int, message: str):
        super().__init__(f"arm {arm.name}: {message}")
        self.arm, self.returncode, self.message = arm, returncode, message


def config_names(group: str) -> list[str]:
    """The options of a config group (the ``.yaml`` files of ``sim_configs/<group>/``)."""
    folder = resources.files(CONFIG_MODULE) / group
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def plan_arms(sim: str, arms: Sequence[str] | None, overrides: Sequence[str]) -> list[Arm]:
    """The arms to run (all of the preset's, or the named subset in that order), each composed once
    with the overrides to check them; ``ConfigError`` for an unknown preset, arm, key or value."""
    presets = config_names("sim")
    if sim not in presets:
        raise ConfigError("--sim", f"unknown preset {sim!r}; allowed: {', '.join(presets)}")
    base = [f"sim={sim}", *overrides]
    params = _compose(base, return_hydra_config=True).hydra.sweeper.params or {}
    if len(params) != 1:
        raise ConfigError("--sim", f"sim={sim} must sweep exactly one parameter (its arms), it sweeps "
                                   f"{len(params)}: {', '.join(map(str, params)) or 'none'}")
    key, values = next(iter(params.items()))
    shipped = [v.strip() for v in str(values).split(",") if v.strip()]
    known = config_names(key.lstrip("+~")) or shipped
    chosen = shipped if arms is None else list(arms)
    unknown = [a for a in chosen if a not in known]
    if unknown:
        raise ConfigError("--arms", f"unknown arm {unknown[0]!r}; allowed: {', '.join(known)}")
    if len(set(chosen)) != len(chosen) or not chosen:
        raise ConfigError("--arms", f"name each arm once, got {','.join(chosen) or 'none'}")
    planned = [Arm(name, key) for name in chosen]
    for arm in planned:  # an override that only some arms' configs have fails here, naming the arm
        _compose([*base, arm.override], key=f"arm {arm.name}")
    return planned


def simulate_command(sim: str, arm: Arm, overrides: Sequence[str], run_dir: Path) -> list[str]:
    """``python -m fl.simulate sim=<sim> <arm> <overrides> hydra.run.dir=<run_dir>``."""
    where = str(run_dir)
    if not re.fullmatch(r"[\w./:~+-]+", where):  # quoted for Hydra's override grammar
        if "'" in where:
            raise ConfigError("--out", f"a run directory must not contain a quote: {run_dir}")
        where = f"'{where}'"
    return [sys.executable, "-m", "fl.simulate", f"sim={sim}", arm.override, *overrides, f"hydra.run.dir={where}"]


def run_arm(command: Sequence[str], arm: Arm, run_dir: Path, stderr: TextIO | None = None) -> None:
    """Run one arm to completion; its stdout passes through, its stderr too but for its ``error:``
    lines. Raises ``ArmFailed`` (with the arm's own error line, or error.txt's) unless it exits 0.
    SIGTERM is passed on to the arm, which stops after the round in progress (as fl.simulate does)."""
    sink = stderr or sys.stderr
    sys.stdout.flush()
    sink.flush()
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    errors = _ErrorLines(sink)
    reader = threading.Thread(target=errors.pump, args=(process.stderr,), daemon=True)
    reader.start()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum)) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        while True:
            try:
                returncode = process.wait()
                break
            except KeyboardInterrupt:  # the arm got the same SIGINT: let it finish its round and stop
                continue
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        reader.join()
    if returncode == 0:
        for line in errors.lines:  # it finished after all: what it said was not fatal
            sink.write(f"{_ErrorLines.PREFIX}{line}\n")
        return
    message = errors.lines[-1] if errors.lines else _error_file_line(run_dir) or f"exit status {returncode}"
    raise ArmFailed(arm, returncode, message)


class _ErrorLines:
    """Copies a child's stderr to ``sink`` as it comes (progress bars included), holding back the
    lines that start with ``error: `` and keeping their text in ``lines``."""

    PREFIX = "error: "

    def __init__(self, sink: TextIO):
        self.sink = sink
        self.lines: list[str] = []
        self._line = ""         # the current line so far, while it may still be an error line
        self._passing = False   # the current line is not one: pass the rest of it through

    def pump(self, stream) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(stream.fileno(), 65536):
            self.feed(decoder.decode(chunk))
        self.feed(decoder.decode(b"", final=True))
        if self._line:
            self._end_line()
        stream.close()

    def feed(self, text: str) -> None:
        while text:
            cut = text.find("\n")
            piece, text = (text, "") if cut < 0 else (text[:cut], text[cut + 1:])
            if self._passing:
                self._write(piece + ("" if cut < 0 else "\n"))
            else:
                self._line += piece
                if not (self._line.startswith(self.PREFIX) or self.PREFIX.startswith(self._line)):
                    self._write(self._line + ("" if cut < 0 else "\n"))
                    self._line, self._passing = "", True
                elif cut >= 0:
                    self._end_line()
            if cut >= 0:
                self._passing = False

    def _end_line(self) -> None:
        if self._line.startswith(self.PREFIX):
            self.lines.append(self._line[len(self.PREFIX):].strip())
        else:
            self._write(self._line + "\n")
        self._line = ""

    def _write(self, text: str) -> None:
        self.sink.write(text)
        self.sink.flush()


def _error_file_line(run_dir: Path) -> str:
    path = run_dir / "error.txt"
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    return f"{lines[0]} (see {path})" if lines else ""


def _compose(overrides: Sequence[str], return_hydra_config: bool = False, key: str = "overrides"):
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
        raise ConfigError(key, " ".join(lines[:3])) from None
