"""core: the training engine shared by every task package.

One subpackage a layer; a layer imports only from the layers before it
(``packages/core/tests/test_layers.py`` checks it, ``docs/architecture.md`` draws it)::

    errors -> config -> nn -> run -> parallel -> task -> engine -> sweep, report -> commands
    (testing may import anything; nothing in core imports commands or testing)

Read in this order: ``config.schema`` (config groups) -> ``task.base`` (what a task provides) ->
``engine.trainer`` (the Fabric loop) -> ``parallel.checkpoint`` / ``run`` (what a run writes) ->
``commands`` (the command-line contract).

Importing ``core`` itself is cheap; torch loads with the submodules that need it.
"""

__version__ = "0.1.0"


def lazy_exports(package: str, home: dict[str, str]):
    """``__getattr__`` for a layer's ``__init__``: ``home`` maps each public name to its module
    in ``package``, imported the first time the name is asked for."""
    import importlib

    def __getattr__(name: str):
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
