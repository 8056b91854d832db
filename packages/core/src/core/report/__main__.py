"""Self-check of :mod:`core.report`: ``python -m core.report``.

Runs the doctests of the modules, then lists and compares two runs written by hand: the
differing key, the ranking, the PNG (marked as ours) and the Markdown table.
"""

import doctest
import json
import tempfile
from pathlib import Path

import yaml

from core.report import collect, compare_output, differing_keys, list_command, plot_compare, ranked
from core.report import rows as rows_module
from core.report.plot import _ours

for module in (rows_module,):
    assert doctest.testmod(module, verbose=False).failed == 0, module.__name__
with tempfile.TemporaryDirectory() as tmp:
    for i, lr in enumerate((1e-3, 3e-4), start=1):
        run = Path(tmp) / f"{i:03d}_20260101_12000{i}"
        run.mkdir()
        config = {"optim": {"lr": lr}, "trainer": {"seed": 1}, "checkpoint": {"mode": "min"}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        summary = {
            "status": "completed",
            "global_step": 4,
            "total_steps": 4,
            "wall_seconds": 3,
            "best": {"metric": "val/loss", "value": 2.0 / i, "step": 4},
        }
        (run / "summary.json").write_text(json.dumps(summary))
        lines = [{"step": s, "train/loss": 3.0 / s / i} for s in range(1, 5)]
        lines.append({"step": 4, "val/loss": 2.0 / i})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    print(list_command(Path(tmp), "table"))
    rows = collect(sorted(Path(tmp).iterdir()))
    assert differing_keys(rows) == ["optim.lr"], differing_keys(rows)
    assert ranked(rows)[0].number == "002"
    png = plot_compare(rows, Path(tmp) / "compare.png")
    assert png is not None and _ours(png)
    print(compare_output(rows, "md", png))
print("core.report: ok")
