"""A benchmark's report kept as a file: ``--out FILE`` writes what the script printed, after a first
line ``$ <the command>``, so the figures the docs quote are the ones a command printed (the docs
test reads the file). The file appears only when the script finishes: a failed or interrupted
benchmark leaves the previous report in place.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def add_out_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the printed report to this file (e.g. docs/results/<name>.txt)")


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def command_line(argv: list[str]) -> str:
    """The command as a user types it from the repository root: ``python bench/<script>.py ...``."""
    script = Path(argv[0])
    shown = f"bench/{script.name}" if script.parent.name == "bench" else argv[0]
    return shlex.join(["python", shown, *argv[1:]])


@contextmanager
def recorded(path: Path | None) -> Iterator[None]:
    """Print as usual; with a path, also keep everything printed and write it there at the end."""
    if path is None:
        yield
        return
    kept = io.StringIO()
    printing = sys.stdout
    sys.stdout = _Tee(printing, kept)
    try:
        yield
    finally:
        sys.stdout = printing
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(f"$ {command_line(sys.argv)}\n{kept.getvalue()}", encoding="utf-8")
    os.replace(partial, path)
