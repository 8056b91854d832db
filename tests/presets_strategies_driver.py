"""Run by ``test_presets_strategies.py`` as each of 2 ranks (started with RANK / WORLD_SIZE /
MASTER_PORT set, so Fabric starts no process of its own): the real ``train`` command of each
planned preset x strategy, one after the other, in the same 2 processes (the imports, most of a
run's cost on a small machine, are paid once).

    python presets_strategies_driver.py PLAN.json

PLAN.json: ``[{"id", "package", "argv"}, ...]``. Rank 0 prints one ``RESULT {json}`` line per
entry: ``{"id", "rc", "stderr"}`` (``rc`` the command's exit code, or ``"exception"`` with the
traceback when the command raised instead of exiting: then both ranks stop, since the other may
wait in a collective).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import traceback
from pathlib import Path


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    rank = int(os.environ["RANK"])
    for item in plan:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                rc: int | str = importlib.import_module(f"{item['package']}.cli").train(
                    item["argv"]
                )
        except SystemExit as exit_:  # argparse
            rc = exit_.code if isinstance(exit_.code, int) else 2
        except BaseException:  # noqa: BLE001 - a traceback is the failure this walk looks for
            rc = "exception"
            err.write(traceback.format_exc())
        if rank == 0:
            result = {"id": item["id"], "rc": rc, "stderr": err.getvalue()[-4000:]}
            print("RESULT " + json.dumps(result), flush=True)
        if rc == "exception":
            sys.stderr.write(err.getvalue())
            os._exit(1)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown with gloo threads about (see core.parallel.strategy)


if __name__ == "__main__":
    main()
