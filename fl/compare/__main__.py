"""``python -m fl.compare``: run every arm of a comparison and draw accuracy against MiB.

    python -m fl.compare                                 # the arms of sim=delta_compare, then the outputs
    python -m fl.compare rounds=3 num_clients=10         # Hydra overrides go to every arm
    python -m fl.compare --arms delta,fedavg_base        # a subset, in this order
    python -m fl.compare --sim compare_sparse            # another preset's arms
    python -m fl.compare --from multirun/<date>_<time>   # only draw a finished sweep (e.g. -m sim=delta_compare)
    python -m fl.compare --runs runs/A runs/B --out cmp  # only draw these runs

Runs go to ``--out`` (default ``multirun/<date>_<time>``), one folder per arm; the charts and the
table are written there (``fl.compare.outputs``). Bad input, a missing or failed run: one line
``error: ...``, exit status 2, and no charts or table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from fl.compare.outputs import XSCALES
from fl.compare.table import DEFAULT_LEVELS
from fl.errors import ConfigError

DEFAULT_SIM = "delta_compare"


class _UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of the project (main prints it)
        raise _UsageError(f"{message} (see python -m fl.compare --help)")


def parse_args(argv: Sequence[str] | None):
    parser = _Parser(prog="python -m fl.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to every arm, e.g. rounds=3")
    parser.add_argument("--sim", default=DEFAULT_SIM, help=f"comparison preset whose arms run (default {DEFAULT_SIM})")
    parser.add_argument("--arms", help="comma-separated subset of the preset's arms (default: all)")
    parser.add_argument("--out", type=Path, help="folder for the runs and the outputs (default multirun/<date>_<time>); "
                                                 "with --runs, for the outputs (default the runs' common parent)")
    parser.add_argument("--from", dest="sweep", type=Path, metavar="DIR", help="draw the finished runs under DIR, run nothing")
    parser.add_argument("--runs", nargs="+", type=Path, metavar="DIR", help="draw these finished runs, run nothing")
    parser.add_argument("--xscale", choices=XSCALES, default="symlog",
                        help="MiB axis: symlog (0 at the origin, logarithmic above the smallest traffic; default) or linear")
    parser.add_argument("--levels", default=",".join(f"{v:g}" for v in DEFAULT_LEVELS),
                        help="comma-separated accuracies for the MiB-to-reach tables (default %(default)s)")
    args = parser.parse_args(argv)
    args.command = "python -m fl.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def parse_levels(text: str) -> list[float]:
    try:
        levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError("--levels", f"comma-separated numbers in (0, 1], got {text!r}") from None
    if any(not 0 < v <= 1 for v in levels):
        raise ConfigError("--levels", f"accuracies must be in (0, 1], got {text!r}")
    return sorted(set(levels))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return compare(parse_args(argv))
    except (ConfigError, _UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def compare(args) -> int:
    from fl.compare.outputs import clear_outputs

    levels = parse_levels(args.levels)
    drawing = args.sweep is not None or args.runs is not None
    if args.sweep is not None and args.runs is not None:
        raise ConfigError("--from", "give --from DIR or --runs DIR..., not both")
    if drawing and (args.overrides or args.arms or args.sim != DEFAULT_SIM):
        raise ConfigError("--from" if args.sweep else "--runs", "draws finished runs; overrides, --arms and --sim "
                                                                 "apply only when the comparison runs its arms")
    if drawing:
        return draw_finished(args, levels)

    from fl.compare.arms import ArmFailed, plan_arms, run_arm, simulate_command
    from fl.compare.runs import load_runs

    arms = plan_arms(args.sim, args.arms.split(",") if args.arms else None, args.overrides)
    out = args.out or Path("multirun") / time.strftime("%Y-%m-%d_%H-%M-%S")
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty; choose another folder, or draw the runs in it "
                                   f"with --from {out}")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = [out / f"{i}_{arm.name}" for i, arm in enumerate(arms)]
    print(f"comparison sim={args.sim}: {len(arms)} arms ({', '.join(a.name for a in arms)}) -> {out}", flush=True)
    started = time.time()
    arm_seconds = []
    for i, (arm, run_dir) in enumerate(zip(arms, run_dirs), start=1):
        command = simulate_command(args.sim, arm, args.overrides, run_dir)
        print(f"[{i}/{len(arms)}] {arm.name}: python {shlex.join(command[1:])}", flush=True)
        arm_started = time.time()
        try:
            run_arm(command, arm, run_dir)
        except ArmFailed as failed:
            clear_outputs(out)
            if created and not any(out.iterdir()):  # the first arm stopped before its run folder was kept
                out.rmdir()
            if failed.returncode in (128 + 2, 128 + 15):  # stopped by SIGINT / SIGTERM: its own line said how to resume
                print(f"comparison stopped during arm {arm.name}; no charts or table written", file=sys.stderr)
                return failed.returncode
            raise ConfigError(f"arm {arm.name}", f"{failed.message} (exit status {failed.returncode}; "
                                                 f"no charts or table written)") from None
        seconds = time.time() - arm_started
        arm_seconds.append(f"{arm.name} {seconds:.0f} s")
        print(f"[{i}/{len(arms)}] {arm.name}: {_summary_line(run_dir)}, {seconds:.0f} s", flush=True)
    runs = load_runs(run_dirs, labels=[arm.name for arm in arms])
    header = (f"`{args.command}` (sim={args.sim}; {time.time() - started:.0f} s "
              f"for all arms: {', '.join(arm_seconds)}); runs: " + ", ".join(f"`{d.name}`" for d in run_dirs) + "\n\n")
    return finish(runs, out, levels, header, args.xscale, f"sim={args.sim}: ")


def draw_finished(args, levels: list[float]) -> int:
    from fl.compare.outputs import clear_outputs
    from fl.compare.runs import find_runs, load_runs

    if args.sweep is not None:
        out = args.out or args.sweep
        dirs = find_runs(args.sweep)
    else:
        dirs = list(args.runs)
        out = args.out or Path(os.path.commonpath([d.resolve() for d in dirs]))
        if len(dirs) == 1 and args.out is None:
            out = dirs[0].resolve().parent
    if not out.is_dir():
        raise ConfigError("--out", f"{out} is not a directory")
    clear_outputs(out)
    runs = load_runs(dirs)
    header = f"`{args.command}`; runs: " + \
             ", ".join(f"`{run.label}` = `{run.path}`" for run in runs) + "\n\n"
    return finish(runs, out, levels, header, args.xscale)


def finish(runs, out: Path, levels: list[float], header: str, xscale: str, title: str = "") -> int:
    from fl.compare.outputs import write_comparison

    comparison = write_comparison(runs, out, levels=levels, header=header, title=title, xscale=xscale)
    print(comparison.table)
    print("wrote " + ", ".join(str(p) for p in comparison.files.values()))
    print(f"curves by bytes in TensorBoard: tensorboard --logdir {out}  (acc_vs_kib/up, acc_vs_kib/total)")
    return 0


def _summary_line(run_dir: Path) -> str:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return (f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}), "
            f"up {summary['cum_up_bytes'] / 2**20:,.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
