"""The strategy and plugin examples of docs/extending.md (the README links them) run as written."""

import re
import sys

from fl.run_logger import read_metrics
from tests.helpers import ROOT, run_inprocess


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "extending.md").read_text(encoding="utf-8"), flags=re.S)


def test_readme_strategy_and_plugin_examples(tmp_path, monkeypatch):
    blocks = _python_blocks()
    strategy_src = next(b for b in blocks if "class FedAvgM" in b)
    plugin_src = next(b for b in blocks if "class ClassifierNorms" in b)
    (tmp_path / "my_strategy.py").write_text(strategy_src, encoding="utf-8")
    (tmp_path / "my_plugin.py").write_text(plugin_src, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_strategy", "my_plugin"):
        sys.modules.pop(name, None)
    summary, run_dir = run_inprocess(tmp_path / "run", [
        "strategy._target_=my_strategy.FedAvgM", "+strategy.server_momentum=0.5",
        "+plugins.norms._target_=my_plugin.ClassifierNorms", "plugins=[update_norms]"])
    assert summary["status"] == "complete"
    row = read_metrics(run_dir)[-1]
    assert row["plugin/norms/class0"] > 0
    assert row["train/plugin/norms/feature_dim"] > 0
    assert row["plugin/update_norms/update_l2"] > 0
