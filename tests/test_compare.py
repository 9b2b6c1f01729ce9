"""``python -m fl.compare``: the arms it runs, the charts and tables it writes, and its errors.

Hand-made run directories with known ``metrics.jsonl`` check the numbers exactly (round 0 counts
towards the MiB-to-level columns, a level never reached is an em dash); one tiny real comparison
(two arms, 4 clients, 2 rounds) checks the whole path through ``python -m fl.simulate``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fl.figures
from fl.compare.__main__ import main
from fl.compare.arms import _ErrorLines, plan_arms
from fl.compare.outputs import OUTPUT_FILES, TABLE_MD, TOTAL_PNG, UP_PNG, symlog_threshold
from fl.compare.runs import find_runs, load_runs
from fl.compare.table import DEFAULT_LEVELS, NOT_REACHED, arm_stats
from fl.errors import ConfigError
from tests.helpers import ROOT, cli_env

MIB = 2**20

# Two arms with known logs: "cheap" starts at 0.55 (above the 0.5 level at round 0), skips the
# evaluation of round 2 and peaks at round 3 twice; "dense" sends 4 MiB up and down per round.
CHEAP = [(0, 0.55, 0, 0), (1, 0.50, 1 * MIB, 2 * MIB), (2, None, 2 * MIB, 4 * MIB), (3, 0.65, 3 * MIB, 6 * MIB),
         (4, 0.65, 4 * MIB, 8 * MIB), (5, 0.60, 5 * MIB, 10 * MIB)]
DENSE = [(0, 0.30, 0, 0), (1, 0.45, 4 * MIB, 4 * MIB), (2, 0.62, 8 * MIB, 8 * MIB), (3, 0.61, 12 * MIB, 12 * MIB)]


def make_run(path: Path, rows, *, arm: str | None = None, summary: bool = True, error: str | None = None) -> Path:
    path.mkdir(parents=True)
    lines = [{"round": r, "accuracy": a, "loss": 1.0, "up_bytes": 0, "down_bytes": 0, "cum_up_bytes": up,
              "cum_down_bytes": down, "clients": 2} for r, a, up, down in rows]
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    if arm is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(f"- sim=delta_compare\n- +arm={arm}\n- rounds=5\n")
    if summary:
        (path / "summary.json").write_text(json.dumps({"status": "complete"}))
    if error is not None:
        (path / "error.txt").write_text(error + "\n")
    return path


@pytest.fixture
def sweep(tmp_path) -> Path:
    make_run(tmp_path / "sweep" / "0_cheap", CHEAP, arm="cheap")
    make_run(tmp_path / "sweep" / "1_dense", DENSE, arm="dense")
    return tmp_path / "sweep"


@pytest.fixture
def drawn(monkeypatch):
    """Records what every chart drew: its series and the number of lines on its axes."""
    calls = []
    original = fl.figures.line_chart

    def recording(series, **kwargs):
        fig = original(series, **kwargs)
        calls.append({"series": {k: (list(x), list(y)) for k, (x, y) in series.items()},
                      "lines": len(fig.axes[0].get_lines()), "xlabel": kwargs["xlabel"]})
        return fig

    monkeypatch.setattr(fl.figures, "line_chart", recording)
    return calls


def table_rows(markdown: str, first_header: str) -> dict[str, list[str]]:
    """The body of the Markdown table whose header starts with ``first_header``: {arm: cells}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def level_tables(markdown: str) -> tuple[dict, dict]:
    lines = markdown.splitlines()
    up_at = next(i for i, line in enumerate(lines) if line.startswith("Uploaded MiB"))
    return table_rows("\n".join(lines[up_at:]), "| arm | to"), \
        table_rows("\n".join(lines[next(i for i, l in enumerate(lines) if l.startswith("Total (up")):]), "| arm | to")


def assert_png_drawn(path: Path) -> None:
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert (image < 128).any() and image.std() > 10, f"{path} looks blank"


# -- the numbers ------------------------------------------------------------------------------------

def test_stats_count_round_zero_and_skip_unevaluated_rounds(sweep):
    cheap, dense = load_runs(find_runs(sweep))
    assert (cheap.label, dense.label) == ("cheap", "dense")
    s = arm_stats(cheap, [0.5, 0.6, 0.65, 0.7])
    assert (s.rounds, s.start_accuracy, s.final_accuracy, s.best_accuracy, s.best_round) == (5, 0.55, 0.60, 0.65, 3)
    assert (s.up_bytes, s.total_bytes) == (5 * MIB, 15 * MIB)
    assert s.reach[0.5].round == 0 and s.reach[0.5].up_bytes == 0  # starts above the level: 0 MiB
    assert (s.reach[0.6].round, s.reach[0.6].up_bytes, s.reach[0.6].total_bytes) == (3, 3 * MIB, 9 * MIB)
    assert s.reach[0.65].round == 3 and s.reach[0.7] is None
    d = arm_stats(dense, [0.5, 0.6, 0.65])
    assert (d.reach[0.5].round, d.reach[0.5].total_bytes) == (2, 16 * MIB) and d.reach[0.65] is None
    assert (d.final_accuracy, d.best_accuracy, d.best_round) == (0.61, 0.62, 2)


def test_draw_a_finished_sweep_writes_charts_and_a_table_that_match_the_logs(sweep, drawn, capsys):
    assert main(["--from", str(sweep), "--levels", "0.5,0.6,0.7"]) == 0
    for name in OUTPUT_FILES:
        assert (sweep / name).is_file()
    assert_png_drawn(sweep / UP_PNG)
    assert_png_drawn(sweep / TOTAL_PNG)
    # one line per arm on each chart, drawn from the evaluated rounds (round 2 of "cheap" has no accuracy)
    assert [call["lines"] for call in drawn] == [2, 2]
    up, total = drawn[0]["series"], drawn[1]["series"]
    assert "uploaded" in drawn[0]["xlabel"] and "downloaded" in drawn[1]["xlabel"]
    assert up["cheap"] == ([0.0, 1.0, 3.0, 4.0, 5.0], [0.55, 0.50, 0.65, 0.65, 0.60])
    assert total["cheap"][0] == [0.0, 3.0, 9.0, 12.0, 15.0]
    assert up["dense"] == ([0.0, 4.0, 8.0, 12.0], [0.30, 0.45, 0.62, 0.61])

    markdown = (sweep / TABLE_MD).read_text()
    main_table = table_rows(markdown, "| arm | rounds")
    assert main_table["cheap"] == ["5", "0.5500", "0.6000", "0.6500 (3)", "5.00", "15.00"]
    assert main_table["dense"] == ["3", "0.3000", "0.6100", "0.6200 (2)", "12.00", "24.00"]
    to_up, to_total = level_tables(markdown)
    assert to_up["cheap"] == ["0.00 (round 0)", "3.00 (round 3)", NOT_REACHED]
    assert to_total["cheap"] == ["0.00 (round 0)", "9.00 (round 3)", NOT_REACHED]
    assert to_up["dense"] == ["8.00 (round 2)", "8.00 (round 2)", NOT_REACHED]
    assert to_total["dense"] == ["16.00 (round 2)", "16.00 (round 2)", NOT_REACHED]
    assert f"]({UP_PNG})" in markdown and f"]({TOTAL_PNG})" in markdown
    assert "| cheap |" in capsys.readouterr().out


def test_the_mib_axis_is_linear_up_to_the_smallest_traffic_and_logarithmic_above():
    assert symlog_threshold({"a": ([0.0, 2.5, 30.0], [0.1] * 3), "b": ([0.0, 0.031], [0.1] * 2)}) == 0.01
    assert symlog_threshold({"a": ([0.0], [0.1])}) == 1.0


def test_runs_are_labelled_by_what_differs_when_no_arm_is_named(tmp_path):
    a = make_run(tmp_path / "a", DENSE)
    b = make_run(tmp_path / "b", CHEAP)
    for path, strategy in ((a, "fedavg"), (b, "feddst")):
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(f"- sim=compare_sparse\n- strategy={strategy}\n")
    assert [run.label for run in load_runs([a, b])] == ["strategy=fedavg", "strategy=feddst"]
    assert main(["--runs", str(a), str(b), "--out", str(tmp_path)]) == 0
    assert "| strategy=feddst | 5 |" in (tmp_path / TABLE_MD).read_text()


def test_the_comparison_is_core_code_that_imports_no_strategy_client_or_plugin(sweep):
    code = ("import sys; from fl.compare.__main__ import main; main(['--from', sys.argv[1]]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'strategies', 'clients', 'plugins'}))")
    env = cli_env()
    done = subprocess.run([sys.executable, "-c", code, str(sweep)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


# -- errors: one line, exit 2, nothing that looks like a result -------------------------------------

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_failed_run_stops_the_drawing_and_removes_earlier_outputs(sweep, capsys):
    assert main(["--from", str(sweep)]) == 0
    make_run(sweep / "2_broken", CHEAP[:2], arm="broken", summary=False, error="RuntimeError: out of memory")
    capsys.readouterr()
    assert main(["--from", str(sweep)]) == 2
    line = one_error_line(capsys)
    assert "2_broken failed (RuntimeError: out of memory)" in line
    assert not any((sweep / name).exists() for name in OUTPUT_FILES)


def test_an_unfinished_run_is_an_error(sweep, capsys):
    make_run(sweep / "2_killed", CHEAP[:2], arm="killed", summary=False)
    assert main(["--from", str(sweep)]) == 2
    assert "did not finish" in one_error_line(capsys)


def test_no_runs_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--from", str(tmp_path / "empty")]) == 2
    assert one_error_line(capsys).startswith("error: --from: no runs under")
    assert not any((tmp_path / "empty" / name).exists() for name in OUTPUT_FILES)


@pytest.mark.parametrize("args, message", [
    (["--arms", "delta,nope"], "error: --arms: unknown arm 'nope'; allowed: delta, fedavg_base, fedavg_edge"),
    (["--sim", "nope"], "error: --sim: unknown preset 'nope'"),
    (["roundz=3"], "error: overrides: Could not override 'roundz'"),
    (["model.construction.train.epochs=5"], "error: arm fedavg_edge: Could not override 'model.construction"),
    (["--levels", "0.5,1.5"], "error: --levels: accuracies must be in (0, 1]"),
    (["--from", "x", "rounds=3"], "error: --from: draws finished runs"),
    (["--bogus"], "error: unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be created here
    assert main(args) == 2
    assert one_error_line(capsys).startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_the_default_arms_are_the_delta_compare_sweep():
    arms = plan_arms("delta_compare", None, [])
    assert [a.override for a in arms] == ["+arm=delta", "+arm=fedavg_edge", "+arm=fedavg_base", "+arm=hermes_base",
                                          "+arm=feddst_base"]
    assert [a.name for a in plan_arms("delta_compare", ["fedavg_base", "delta"], ["rounds=3"])] == ["fedavg_base", "delta"]
    with pytest.raises(ConfigError, match="name each arm once"):
        plan_arms("delta_compare", ["delta", "delta"], [])


def test_error_lines_of_an_arm_are_held_back_and_the_rest_passes_through():
    sink = io.StringIO()
    lines = _ErrorLines(sink)
    for chunk in ["model: x\n\nerr", "or: fraction_fit: bad\n", "\r 10%|#", "\r 20%|##", "\n", "Traceback\n"]:
        lines.feed(chunk)
    assert sink.getvalue() == "model: x\n\n\r 10%|#\r 20%|##\nTraceback\n"
    assert lines.lines == ["fraction_fit: bad"]


# -- bench/compare_strategies.py reads the same tables ----------------------------------------------

def bench(*args) -> subprocess.CompletedProcess:
    env = cli_env()
    return subprocess.run([sys.executable, str(ROOT / "bench" / "compare_strategies.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_bench_reference_is_the_named_run_and_round_zero_counts(tmp_path):
    make_run(tmp_path / "0_fedavg_edge", [(0, 0.30, 0, 0), (1, 0.32, MIB, MIB)], arm="fedavg_edge")
    make_run(tmp_path / "1_fedavg_base", [(0, 0.72, 0, 0), (1, 0.70, 4 * MIB, 4 * MIB)], arm="fedavg_base")
    done = bench(str(tmp_path), "--reference", "fedavg_base")
    assert done.returncode == 0, done.stderr
    assert "reference: fedavg_base's final accuracy 0.7000" in done.stdout  # not the edge arm's 0.32
    assert table_rows(done.stdout, "| arm | to")["fedavg_base"] == ["0.00 (round 0)"]  # 0.72 at round 0 >= 0.70
    assert table_rows(done.stdout, "| arm | to")["fedavg_edge"] == [NOT_REACHED]
    wrong = bench(str(tmp_path), "--reference", "FedAvg")
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: --reference: no run labelled 'FedAvg'")


# -- one tiny real comparison through python -m fl.simulate -----------------------------------------

TINY = ["num_clients=4", "fraction_fit=0.5", "rounds=2", "progress=false", "checkpoint_every=0", "train.epochs=1",
        "train.batch_size=32", "train.momentum=0.0", "data.samples_per_client=16", "data.test_size=64"]


def test_a_tiny_real_comparison(tmp_path, drawn, capsys):
    out = tmp_path / "cmp"
    assert main(["--sim", "compare_sparse", "--arms", "fedavg,feddst", "--out", str(out), *TINY]) == 0
    runs = {p.name: p for p in out.iterdir() if p.is_dir()}
    assert sorted(runs) == ["0_fedavg", "1_feddst"]
    for run in runs.values():  # the TensorBoard overlay: every arm's events next to each other
        assert list(run.glob("events.out.tfevents.*")), f"{run} has no TensorBoard events"
    assert_png_drawn(out / UP_PNG)
    assert_png_drawn(out / TOTAL_PNG)
    assert [call["lines"] for call in drawn] == [2, 2]
    markdown = (out / TABLE_MD).read_text()
    main_table = table_rows(markdown, "| arm | rounds")
    to_up, _ = level_tables(markdown)
    for name, arm in (("0_fedavg", "fedavg"), ("1_feddst", "feddst")):
        rows = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        accuracies = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        assert main_table[arm] == [str(rows[-1]["round"]), f"{rows[0]['accuracy']:.4f}", f"{accuracies[-1]:.4f}",
                                   f"{max(accuracies):.4f} ({rows[accuracies.index(max(accuracies))]['round']})",
                                   f"{rows[-1]['cum_up_bytes'] / MIB:,.2f}",
                                   f"{(rows[-1]['cum_up_bytes'] + rows[-1]['cum_down_bytes']) / MIB:,.2f}"]
        assert drawn[0]["series"][arm] == ([r["cum_up_bytes"] / MIB for r in rows], accuracies)
        expected = []
        for level in DEFAULT_LEVELS:  # the first evaluated row at or above the level, round 0 included
            hit = next((r for r in rows if r["accuracy"] is not None and r["accuracy"] >= level), None)
            expected.append(NOT_REACHED if hit is None else f"{hit['cum_up_bytes'] / MIB:,.2f} (round {hit['round']})")
        assert to_up[arm] == expected
    assert "wrote" in capsys.readouterr().out


def test_a_failing_arm_is_one_error_line_and_no_outputs(tmp_path, capfd):
    out = tmp_path / "cmp"
    env = cli_env()
    done = subprocess.run([sys.executable, "-m", "fl.compare", "--sim", "compare_sparse", "--arms", "fedavg", "--out",
                           str(out), *TINY, "fraction_fit=1.5"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors == ["error: arm fedavg: fraction_fit: must be in (0, 1], got 1.5 (exit status 2; no charts or "
                      "table written)"], done.stderr
    assert not out.exists()  # the arm's run folder was never kept, and the comparison's folder went with it
