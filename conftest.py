"""Workspace-wide pytest hooks: the ``quick`` tier.

``uv run pytest -m quick`` runs every test that is not marked ``slow`` (subprocess jobs),
``trains`` (trains a model, in-process or in a subprocess), ``slurm``, ``release`` or ``gpu``:
config, data readers, collators, loss equivalences, the output guard and the CLI parsers, in
about a minute on two cores. The marker is applied here, at collection, so a new test is quick
unless it says otherwise; a test that trains says so with ``@pytest.mark.trains``.
"""

from __future__ import annotations

import pytest

NOT_QUICK = ("slow", "trains", "slurm", "release", "gpu")
"""Markers that keep a test out of the quick tier."""


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every collected test that carries none of :data:`NOT_QUICK` as ``quick``."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in NOT_QUICK):
            item.add_marker(pytest.mark.quick)
