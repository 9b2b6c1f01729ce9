"""Refactorings keep results bit-identical: FedAvg, FedDST-like, Hermes-like and DELTA, 3 rounds at a
fixed seed, give the final model and ``metrics.jsonl`` (timing fields aside) recorded in
``tests/golden_results.json`` (``python -m tests.golden`` rewrites it, for changes meant to alter results).

The figures are exact on the pinned stack (``constraints.txt``) on an x86-64 CPU.
"""

import json

import pytest

from tests.golden import CASES, RESULTS, record


@pytest.mark.parametrize("case", sorted(CASES))
def test_results_are_bit_identical_to_the_golden_run(case, tmp_path):
    expected = json.loads(RESULTS.read_text(encoding="utf-8"))[case]
    got = record(case, tmp_path)
    assert got["metrics"] == expected["metrics"]
    assert got["model_sha256"] == expected["model_sha256"]
