"""The documentation cannot drift: the configuration reference is the generator's output and lists
exactly the keys the config files hold, every top-level key has a meaning, every relative link (and
image) in README.md and docs/ points to a file that exists and, with an anchor, to a heading of it,
every figure of a table marked as coming from a results file is in that file, and every paragraph
that quotes a figure names the results or config files that hold it, and they do (in the figure's
own unit)."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fl.config_reference import ROOT as CONFIGS
from fl.config_reference import entries, reference

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]  # docs/results/ too


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


def _prose(page: Path) -> str:
    return re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # not inside code blocks


def _links(page: Path):
    """(file, anchor) of every relative link and image source."""
    text = _prose(page)
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)
    for target in targets:
        if not re.match(r"[a-z]+://|mailto:", target):
            path, _, anchor = target.partition("#")
            yield path, anchor


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, tags and punctuation but `-` and `_` dropped, spaces
    to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", _prose(page), flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    missing = []
    for path, anchor in _links(page):
        target = (page.parent / path) if path else page
        if not target.exists():
            missing.append(path)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            missing.append(f"{path}#{anchor}")
    assert missing == []


def test_the_slug_rule_matches_github():
    assert _slug("3. SuperNodes on a Raspberry Pi") == "3-supernodes-on-a-raspberry-pi"
    assert _slug("CPU or GPU: `compute=`") == "cpu-or-gpu-compute"
    assert _slug("How bytes are counted") == "how-bytes-are-counted"
    assert _slug("`metrics.jsonl`") == "metricsjsonl"
    assert _slug("`keep_checkpoint` and resume") == "keep_checkpoint-and-resume"


# -- measured figures: a table marked <!-- figures from: results/<file> --> quotes only that file -------

MARKER = re.compile(r"^<!-- figures from: (\S+(?: \S+)*?) -->\n((?:\|.*\|\n?)+)", flags=re.M)
UNITS = re.compile(r"KiB|MiB|GiB|%|\*\*")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
RESULTS = {"delta_tiers.json", "scale.json", "compare_seed0.md", "compare_seed1.md", "engine_overhead.txt",
           "engine_overhead_repeats.txt", "vectorized.txt", "xdelta_throughput.txt", "xdelta_explain.json",
           "agilenn_mnist.txt", "agilenn_synthetic.txt", "agilenn_easy.txt", "compression_shards.txt",
           "compression_iid.txt", "compression_iid_no_finetune.txt", "delta_build.json",
           "compare_sparse.md", "pictures_compression_table.md",
           "delta_ablation.json", "faults.txt", "xdelta_designed_seed0.txt", "xdelta_designed_seed1.txt",
           "xdelta_designed_seed2.txt", "xdelta_designed_box30.txt", "xdelta_designed_box12.txt",
           "xdelta_designed_flat.txt", "hostile.txt", "delta_build_60.json",
           "delta_build_unshifted.json", "delta_build_unshifted_60.json",
           "agilenn_federated_mnist.txt", "agilenn_federated_synthetic.txt",
           "payload_codec.txt", "gpu_h200.log"}


def _marked_tables():
    """(page, its results files, the table) of every table marked ``<!-- figures from: a [b ...] -->``."""
    for page in PAGES:
        for sources, table in MARKER.findall(page.read_text(encoding="utf-8")):
            yield page, [page.parent / source for source in sources.split()], table


def _numbers_in(text: str) -> list[str]:
    return [n.replace(",", "") for n in NUMBER.findall(text)]


# The unit changes a table's figure may be quoted in: share as a percentage, bytes as KiB, MiB or GiB.
ANY_UNIT = (1, 100, 1 / 1024, 1 / 1024 ** 2, 1 / 1024 ** 3)


@functools.lru_cache(maxsize=None)
def _values(path: Path, scales: tuple[float, ...] = ANY_UNIT) -> tuple[float, ...]:
    """Every number the file holds, in each of the unit changes ``scales``."""
    if path.suffix == ".json":
        def leaves(node):
            if isinstance(node, dict):
                for value in node.values():
                    yield from leaves(value)
            elif isinstance(node, list):
                for value in node:
                    yield from leaves(value)
            elif isinstance(node, (int, float)) and not isinstance(node, bool):
                yield float(node)
        raw = list(leaves(json.loads(path.read_text(encoding="utf-8"))))
    else:
        raw = [float(n) for n in _numbers_in(path.read_text(encoding="utf-8"))]
    return tuple(v * scale for v in raw for scale in scales)


def _quoted(table: str) -> list[str]:
    """The numbers of a table's body: every cell that holds figures only (a cell with words is a
    label and is skipped)."""
    figures = []
    for row in table.strip().splitlines()[2:]:  # past the header and the rule
        for cell in row.strip().strip("|").split("|"):
            bare = UNITS.sub("", cell)
            if not re.search(r"[A-Za-z_`]", bare):
                figures += _numbers_in(bare)
    return figures


def _appears(figure: str, values: list[float]) -> bool:
    """The figure is one of the values after rounding to the figure's decimals (either way a half
    rounds)."""
    decimals = len(figure.partition(".")[2])
    target = float(figure)
    return any(math.isclose(abs(v - target), 0, abs_tol=0.5 * 10 ** -decimals * (1 + 1e-9)) for v in values)


def test_every_results_file_has_its_marked_tables():
    sources = {source.name for _, files, _ in [*_marked_tables(), *_marked_paragraphs()] for source in files}
    assert RESULTS <= sources


def test_every_results_file_is_named_by_a_page():
    """A file in docs/results/ that no page names or links is a figure nobody quotes."""
    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    unnamed = [f.name for f in sorted((REPO / "docs" / "results").iterdir()) if f.name not in text]
    assert unnamed == []


def test_a_benchmark_report_starts_with_the_command_that_wrote_it():
    for report in sorted((REPO / "docs" / "results").glob("*.txt")):
        first = report.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("$ python bench/") and f"/{report.name}" in first.partition("--out ")[2], report.name


@pytest.mark.parametrize("page, files, figures", [(page, files, _quoted(table)) for page, files, table in _marked_tables()],
                         ids=lambda x: x.name if isinstance(x, Path) else "")
def test_every_figure_of_a_marked_table_is_in_its_results_file(page, files, figures):
    """A table's figures are in its results file (in one of them, where the marker names several)."""
    _assert_in_results(page, files, [(figure, ANY_UNIT) for figure in figures])


def _assert_in_results(page: Path, files: list[Path], figures: list[tuple[str, tuple[float, ...]]]) -> None:
    """Each (figure, the unit changes it may be quoted in) is in one of ``files``."""
    names = ", ".join(source.name for source in files)
    assert all(source.exists() for source in files), f"{page.name}: no {names}"
    assert figures, f"{page.name}: the block marked with {names} quotes no figure"
    assert _missing(files, figures) == [], f"{page.name}: figures not in {names}"


def _missing(files: list[Path], figures: list[tuple[str, tuple[float, ...]]]) -> list[str]:
    return [figure for figure, scales in figures
            if not _appears(figure, [v for source in files for v in _values(source, scales)])]


# -- measured figures in prose: a paragraph marked <!-- prose figures from: ... --> ---------------------

PROSE_MARKER = re.compile(r"^<!-- prose figures from: (\S+(?: \S+)*?) -->\n((?:.+\n?)+)", flags=re.M)
# A figure in prose: a number with decimals, or one with a unit of measure after it (seconds,
# percent, bytes, points); numbers in code spans are commands and settings, not figures.
PROSE_FIGURE = re.compile(r"(?<![\w.])(-?\d[\d,]*\.\d+|-?\d[\d,]*(?= ?(?:m?s\b|%|[KMGT]i?B\b|x\b|points?\b"
                          r"|bytes\b|min\b|minutes?\b|hours?\b)))( ?(?:m?s\b|%|[KMGT]i?B\b|x\b|points?\b|bytes\b"
                          r"|min\b|minutes?\b|hours?\b))?")
# The unit changes a prose figure may be quoted in, by its unit: a share as a percentage or
# points, a size in a binary unit from a smaller one; a time, ratio or plain count as it is written.
PROSE_SCALES = {"%": (1, 100), "points": (1, 100), "point": (1, 100), "": (1, 100), "KiB": (1, 1 / 1024),
                "MiB": (1, 1 / 1024, 1 / 1024 ** 2), "GiB": (1, 1 / 1024, 1 / 1024 ** 2, 1 / 1024 ** 3)}
CODE_SPAN = re.compile(r"`[^`]*`")


def _marked_paragraphs():
    for page in PAGES:
        for sources, paragraph in PROSE_MARKER.findall(page.read_text(encoding="utf-8")):
            yield page, [page.parent / source for source in sources.split()], paragraph


def _prose_figures(paragraph: str) -> list[tuple[str, str]]:
    """(figure, its unit or "") of every prose figure."""
    return [(n.replace(",", ""), unit.strip()) for n, unit in PROSE_FIGURE.findall(CODE_SPAN.sub("", paragraph))]


def test_prose_figures_are_found_in_text():
    text = ("took 0.130 s a round against 0.468 s (0.28x), 543 s, 9.35 points, 73% and `--rounds 3` at 2 px; "
            "40x less, 560 MB, 10 ms, 6 hours, 2 minutes, a -0.20 difference, 42-49%, a 2x2 map, 1/sqrt2")
    figures = _prose_figures(text)
    assert [f for f, _ in figures] == ["0.130", "0.468", "0.28", "543", "9.35", "73", "40", "560", "10", "6", "2",
                                       "-0.20", "49"]
    assert [u for _, u in figures][:6] == ["s", "s", "x", "s", "points", "%"] and figures[-2] == ("-0.20", "")


def test_a_prose_figure_matches_its_file_only_in_its_own_unit(tmp_path):
    """A time or a count is not a share: 26 s does not match a file's 0.257, 26% does."""
    source = tmp_path / "r.txt"
    source.write_text("locality 0.257, upload 2186470 bytes\n")
    assert _missing([source], _in_own_units(_prose_figures("took 26 s"))) == ["26"]
    assert _missing([source], _in_own_units(_prose_figures("26% local, 2.1 MiB, 0.257 on average"))) == []


@pytest.mark.parametrize("page, files, paragraph", list(_marked_paragraphs()),
                         ids=lambda x: x.name if isinstance(x, Path) else "")
def test_every_figure_of_a_marked_paragraph_is_in_its_results_file(page, files, paragraph):
    _assert_in_results(page, files, _in_own_units(_prose_figures(paragraph)))


def _in_own_units(figures: list[tuple[str, str]]) -> list[tuple[str, tuple[float, ...]]]:
    return [(figure, PROSE_SCALES.get(unit, (1,))) for figure, unit in figures]


def _paragraphs(page: Path):
    """The page's blocks of consecutive non-blank lines outside code blocks, as text."""
    block, fenced = [], False
    for line in [*page.read_text(encoding="utf-8").splitlines(), ""]:
        if line.lstrip().startswith("```"):
            fenced, block = not fenced, []
        elif fenced:
            continue
        elif line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []


# Pages whose figures are their own source: the generated configuration reference (its defaults are
# the YAML's, checked above) and the results files themselves.
SOURCES = {REPO / "docs" / "configuration.md", *(REPO / "docs" / "results").glob("*.md")}


@pytest.mark.parametrize("page", [p for p in PAGES if p not in SOURCES], ids=lambda p: p.name)
def test_every_paragraph_with_figures_names_where_they_come_from(page):
    """A figure in running prose is either in a code span (a command or a setting) or in a paragraph
    marked with the results or config files that hold it; tables and headings are checked above."""
    unmarked = [paragraph.splitlines()[0][:70] for paragraph in _paragraphs(page)
                if not paragraph.startswith(("<!--", "|", "#")) and _prose_figures(paragraph)]
    assert unmarked == [], f"{page.name}: paragraphs quoting figures without a marker"

# -- the model zoo's table is what the counter says ---------------------------------------------------

ZOO_ROW = re.compile(r"^\| `(\w+)` \|[^|]*\| ([\d,]+) \| ([\d.]+) M \|$", flags=re.M)


def _zoo_rows():
    return ZOO_ROW.findall((REPO / "docs" / "models.md").read_text(encoding="utf-8"))


def test_the_zoo_table_lists_every_model_of_the_registry():
    from fl.models import list_models

    listed = {name for name, _, _ in _zoo_rows()}
    assert len(listed) >= 8
    assert listed <= set(list_models())


@pytest.mark.parametrize("name, params, macs", _zoo_rows(), ids=lambda x: x if isinstance(x, str) and "," not in x else "")
def test_the_zoo_table_gives_each_models_counts(name, params, macs):
    from fl.models import get_model, model_profile

    profile = model_profile(get_model(name, num_classes=10))
    assert profile["params"] == int(params.replace(",", ""))
    assert round(profile["macs"] / 1e6, 1) == float(macs)
