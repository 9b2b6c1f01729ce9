"""Golden results: four strategies, 3 rounds, fixed seed; the final model's hash and ``metrics.jsonl``
without its timing fields. A refactoring must leave them bit-identical (``tests/test_golden.py``).

Regenerate only for a change that is meant to alter results, and say why in the commit:
``python -m tests.golden`` rewrites ``tests/golden_results.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from tests.helpers import run_inprocess

RESULTS = Path(__file__).with_name("golden_results.json")
ROUNDS = ["rounds=3", "seed=0"]
TINY_DELTA = ["model.pair.server_samples=48", "model.pair.server_difficulty=null", "model.pair.base.name=vgg8", "model.pair.base.width=0.125",
              "+model.pair.edge.width=0.25", "+model.pair.edge.hidden=16", "model.pair.base_recipe.epochs=1",
              "model.pair.edge_recipe.epochs=1", "model.construction.extract.epochs=1",
              "model.construction.extract.finetune.epochs=0", "model.construction.train.epochs=1",
              "model.construction.kd=null", "model.construction.extract.budget=1.0",
              "model.construction.extract.delta_dim=6", "model.construction.extract.resizer_hidden=8"]
CASES = {
    "fedavg": [],
    "feddst": ["strategy=feddst"],
    "hermes": ["strategy=hermes"],
    "delta": ["sim=delta_100clients", "num_clients=8", "fraction_fit=0.5", "strategy.tier_eval_every=1", *TINY_DELTA],
}


def is_timing(key: str) -> bool:
    return key.endswith(("_s", "seconds")) or "unix" in key or key.startswith("time/")


def model_hash(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def record(case: str, workdir: Path) -> dict:
    overrides = [*ROUNDS, *CASES[case]]
    if case == "delta":
        overrides.append(f"model.cache_dir={workdir}/cache")
    summary, run_dir = run_inprocess(workdir / case, overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"status": summary["status"], "model_sha256": model_hash(run_dir / "final_model.pt"),
            "metrics": [{k: v for k, v in row.items() if not is_timing(k)} for row in rows]}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        results = {case: record(case, Path(tmp)) for case in CASES}
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}", file=sys.stderr)
