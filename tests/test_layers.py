"""The import layers of pyproject.toml's ``[tool.importlinter]`` contracts hold (import-linter).

The core of ``fl`` imports nothing from ``strategies``, ``clients`` or ``plugins`` (only the entry
points do), strategies sit above clients above plugins, and no sibling modules import each other
in a cycle. A broken contract prints import-linter's report naming the offending import chain.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                "sys.exit(lint_imports_command())", "--no-cache"]  # the `lint-imports` command


def test_import_contracts_are_kept():
    done = subprocess.run(LINT_IMPORTS, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout


def test_a_core_module_importing_a_strategy_breaks_the_contract(tmp_path):
    """The contract is live: the same check on a copy whose core imports ``strategies`` fails."""
    for package in ("fl", "strategies", "clients", "plugins"):
        subprocess.run(["cp", "-r", str(ROOT / package), str(tmp_path / package)], check=True)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    sampling = tmp_path / "fl" / "sampling.py"
    sampling.write_text(sampling.read_text() + "\nimport strategies  # noqa: E402\n")
    done = subprocess.run(LINT_IMPORTS, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert done.returncode == 1
    assert "fl.sampling -> strategies" in done.stdout


def test_no_module_cites_a_file_outside_the_repository():
    """Docstrings cite papers and equations; the team's design notes are not part of the product."""
    cited = [f"{path.relative_to(ROOT)}:{number}" for package in ("fl", "strategies", "clients", "plugins")
             for path in sorted((ROOT / package).rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if any(word in line for word in ("DESIGN.md", "STYLE.md", "STYLE rule", "DESIGN section", "../shared"))]
    assert cited == []
