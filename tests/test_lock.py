"""The pinned stack: ``constraints.txt`` pins the whole closure of ``.[dev]``, and what is installed is it.

The README installs with ``pip install -c constraints.txt -e ".[dev]"``; these checks fail, naming the
package, when the environment drifted from the pins (e.g. a torch that was upgraded later) or when a
dependency was added to pyproject.toml without regenerating the file (command in its header).
"""

from __future__ import annotations

import importlib.metadata as metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line whose marker applies here."""
    pins = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        requirement = Requirement(text)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise AssertionError(f"{path.name}:{number}: not an exact pin: {text!r}")
        if requirement.marker is None or requirement.marker.evaluate():
            pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins


def direct_dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def installed_mismatches(pins: dict[str, str]) -> list[str]:
    """One line per pinned package installed at another version (packages not installed are skipped)."""
    lines = []
    for name, pinned in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed != pinned:
            lines.append(f"{name}: pinned {pinned}, installed {installed}")
    return lines


def test_constraints_file_pins_torch_and_torchvision_as_a_pair():
    pins = read_pins()
    assert {"torch", "torchvision"} <= pins.keys()
    assert len(pins) > 50, "the file should pin the whole closure, not just the direct dependencies"


def test_every_direct_dependency_is_pinned_within_its_pyproject_range():
    pins = read_pins()
    unpinned = [str(r) for r in direct_dependencies() if canonicalize_name(r.name) not in pins]
    assert not unpinned, f"constraints.txt lacks {unpinned}; regenerate it (command in its header)"
    outside = [f"{r.name}: pinned {pins[canonicalize_name(r.name)]}, pyproject wants {r.specifier}"
               for r in direct_dependencies() if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, "; ".join(outside)


def test_installed_versions_are_the_pinned_ones():
    mismatches = installed_mismatches(read_pins())
    assert not mismatches, ("installed versions differ from constraints.txt (reinstall with "
                            "pip install -c constraints.txt -e \".[dev]\"): " + "; ".join(mismatches))


def test_a_drifted_package_is_reported_with_both_versions():
    pins = {"pytest": "0.0.1", "surely-not-an-installed-package": "1.0"}
    assert installed_mismatches(pins) == [f"pytest: pinned 0.0.1, installed {metadata.version('pytest')}"]


def test_a_range_in_the_constraints_file_is_refused(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("# header\ntorch==2.14.1\n    # via x\nnumpy>=1.26\n", encoding="utf-8")
    with pytest.raises(AssertionError, match=r"constraints.txt:4: not an exact pin: 'numpy>=1.26'"):
        read_pins(path)
