"""The configuration reference, generated from ``sim_configs/``: every key, its default and its
meaning, taken from the comment beside the key in the YAML file.

    python -m fl.config_reference > docs/configuration.md

``tests/test_docs.py`` checks that ``docs/configuration.md`` is this module's output, so the page
cannot drift from the config tree. YAML parsers drop comments (PyYAML, OmegaConf), so the files are
read line by line here; this covers the block style the config tree is written in (``key: value
# meaning``, nested mappings by indentation, a meaning continued on comment lines indented past
the key; a mapping written inline, ``{epochs: 3, lr: 0.01}``, is one entry), which
``test_docs.py`` checks against the keys OmegaConf loads.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import sim_configs

ROOT = Path(sim_configs.__file__).parent
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_+][\w.+-]*):(?P<rest>.*)$")


@dataclass
class Entry:
    key: str  # dotted, from the file's root
    default: str  # the YAML text of the value ("" for a mapping)
    meaning: str


def entries(path: Path) -> tuple[str, list[Entry]]:
    """(the file's header comment, its keys in file order)."""
    header: list[str] = []
    out: list[Entry] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    last: Entry | None = None
    last_indent = -1
    in_header = True
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if in_header:
                if not text.startswith("@package"):
                    header.append(text)
            elif last is not None and len(line) - len(line.lstrip()) > last_indent:
                last.meaning = f"{last.meaning} {text}".strip()
            continue
        in_header = False
        match = _KEY.match(line)
        if not match:
            continue  # list items (the defaults list), blank lines
        indent = len(match["indent"])
        value, _, comment = _split_comment(match["rest"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match["key"]])
        last, last_indent = Entry(key, value.strip(), comment.strip()), indent
        if key != "defaults":
            out.append(last)
        if not value.strip():
            stack.append((indent, match["key"]))
    return " ".join(header), out


def _split_comment(text: str) -> tuple[str, str, str]:
    """``value  # comment`` -> (value, "#", comment), a ``#`` inside quotes or ``${...}`` kept."""
    quote, depth = "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or text[i - 1].isspace()):
            return text[:i], "#", text[i + 1:]
    return text, "", ""


def _table(rows: list[Entry]) -> list[str]:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for e in rows:
        default = f"`{e.default}`" if e.default else ""
        lines.append(f"| `{e.key}` | {default.replace('|', '&#124;')} | {e.meaning.replace('|', '&#124;')} |")
    return lines


def reference() -> str:
    header, top = entries(ROOT / "config.yaml")
    lines = ["# Configuration reference", "",
             "Generated from `sim_configs/` by `python -m fl.config_reference > docs/configuration.md` (a test",
             "checks that this page is current). Every key is set on the command line as `key=value`, e.g.",
             "`python -m fl.simulate rounds=50 train.lr=0.01`; a group is chosen with `group=option`, e.g.",
             "`strategy=hermes`, and its keys are then `strategy.<key>=value`.", "",
             "## Top level (`sim_configs/config.yaml`)", "", header, "", *_table(top), "", "## Config groups", ""]
    for group in sorted(p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(group.glob("*.yaml"))
        if not options:
            continue
        lines += [f"### `{group.name}=`", ""]
        for option in options:
            about, rows = entries(option)
            lines += [f"#### `{group.name}={option.stem}`", ""]
            if about:
                lines += [about, ""]
            if rows:
                lines += [*_table(rows), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
