"""The documentation cannot drift: the configuration reference is the generator's output and lists
exactly the keys the config files hold, every top-level key has a meaning, and every relative link
in README.md and docs/ points to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fl.config_reference import ROOT as CONFIGS
from fl.config_reference import entries, reference

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_configuration_reference_is_current():
    assert (REPO / "docs" / "configuration.md").read_text(encoding="utf-8") == reference(), \
        "regenerate it: python -m fl.config_reference > docs/configuration.md"


def _keys(node, prefix=""):
    for key, value in node.items():
        if key == "defaults":
            continue
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_the_reference_reads_every_key_omegaconf_loads(path):
    """The line reader of fl.config_reference against a real YAML parser, file by file."""
    loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    rows = entries(path)[1]
    inline = [e.key + "." for e in rows if e.default.startswith("{")]  # one entry for a mapping written inline
    assert [e.key for e in rows] == [k for k in _keys(loaded) if not k.startswith(tuple(inline))]


def test_every_top_level_setting_says_what_it_means():
    _, rows = entries(CONFIGS / "config.yaml")
    unexplained = [e.key for e in rows if not e.meaning and e.default and not e.key.startswith("hydra.")]
    assert unexplained == []


def _links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # not inside code blocks
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+://|#|mailto:", target):
            yield target.split("#")[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    missing = [target for target in _links(page) if target and not (page.parent / target).exists()]
    assert missing == []
