"""core: the training engine shared by every task package.

One subpackage a layer; a layer imports only from the layers before it
(``packages/core/tests/test_layers.py`` checks it, ``docs/architecture.md`` draws it)::

    errors -> config -> nn -> run -> parallel -> task -> engine -> sweep, report -> commands
    (testing may import anything; nothing in core imports commands or testing)

Read in this order: ``config.schema`` (config groups) -> ``task.base`` (what a task provides) ->
``engine.trainer`` (the Fabric loop) -> ``parallel.checkpoint`` / ``run`` (what a run writes) ->
``commands`` (the command-line contract).

Importing ``core`` itself is cheap; torch loads with the submodules that need it. Each layer's
``__init__`` lists its public names by module (:func:`lazy_exports`): ``from core.run import X``
loads X's module on first use; importing the layer alone loads nothing.
"""

from typing import Any

__version__ = "0.1.0"


LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("config",),
    ("nn",),
    ("run",),
    ("parallel",),
    ("task",),
    ("engine",),
    ("sweep", "report"),
    ("commands",),
]
"""The layers, lowest first: a module may import from its own layer and the layers before it;
layers in one tuple share a rank and must not import each other in a cycle. ``testing`` is outside
the order: it may import every layer, and no layer imports it (a self-check block may)."""


def lazy_exports(package: str, names: dict[str, str]) -> tuple[list[str], Any]:
    """``__all__`` and ``__getattr__`` of a layer's ``__init__``.

    Args:
        package: the layer's dotted name (``__name__``).
        names: module of the layer -> its public names, separated by spaces.

    Returns:
        ``(__all__, __getattr__)``: the sorted names, and the module-level ``__getattr__`` that
        imports a name's module the first time the name is asked for.
    """
    import importlib

    home = {name: module for module, listed in names.items() for name in listed.split()}

    def __getattr__(name: str) -> Any:
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(home), __getattr__
