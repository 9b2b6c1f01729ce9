"""Compare strategies by accuracy against communication cost: ``python -m fl.compare``.

Runs every arm of a comparison preset (by default ``sim=delta_compare``: DELTA against FedAvg on the
edge and on the base, Hermes-like and FedDST-like) as its own ``python -m fl.simulate`` run, or
reads runs that already finished, and writes next to them (``fl.compare.outputs``):

- ``compare_up.png`` and ``compare_total.png``: central test accuracy against cumulative uploaded
  MiB and against cumulative total (upload + download) MiB, one line per arm, round 0 at 0 MiB;
- ``compare.md``: per arm its start, final and best accuracy, MiB uploaded and in total, and the MiB
  it needed to first reach fixed accuracy levels (a level met at round 0 costs 0 MiB);
- the runs themselves, siblings in one folder, so ``tensorboard --logdir <that folder>`` overlays
  them on ``acc_vs_kib/up`` and ``acc_vs_kib/total``.

This is the comparison of the DELTA paper's FL use case (Wang and Nirjon, "XDELTA: Explaining the
Difference Between Edge Models and High-Accuracy Base Models for Vision Tasks", Fig. 16a: accuracy
against communication cost per strategy). The package reads only what runs log (``metrics.jsonl``,
``summary.json``, ``error.txt``, Hydra's ``.hydra/overrides.yaml``); it measures nothing itself.
"""

from fl.compare.runs import Run, find_runs, load_runs
from fl.compare.table import ArmStats, arm_stats, markdown_tables

__all__ = ["ArmStats", "Run", "arm_stats", "find_runs", "load_runs", "markdown_tables"]
