"""core: the training engine shared by every task package.

Read in this order: ``settings`` (config groups) -> ``task`` (what a task provides) ->
``trainer`` (the Fabric loop) -> ``checkpoint`` / ``runs`` / ``manifest`` / ``logs`` (what a run
writes) -> ``cli`` / ``launcher`` (the command-line contract).

Importing ``core`` itself is cheap; torch loads with the submodules that need it.
"""

__version__ = "0.1.0"
