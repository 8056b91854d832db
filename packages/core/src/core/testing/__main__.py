"""``python -m core.testing train|evaluate ...``: the toy task's commands (see
:mod:`core.testing.toy`, which runs the same way as ``python -m core.testing.toy``)."""

import runpy

if __name__ == "__main__":  # self-check: python -m core.testing train trainer.max_steps=2
    runpy.run_module("core.testing.toy", run_name="__main__", alter_sys=True)
