"""summarization: dialogue summarization (DialogSum) with BART / T5 on the core engine, with ROUGE
that works for English and Korean.

Modules, as in every task package: ``config`` (the config tree, the presets folder and default),
``data`` (reading, checks, tokenising, batching), ``model`` (loading, from-scratch BART,
freezing), ``task`` (the engine's Task, evaluation hooks included), ``memory`` (the dry-run
estimate), ``cli`` (``SPEC``, the task's declaration, and its commands: train, evaluate, predict,
score, lead3). Each runs a self-check with ``python -m summarization.<module>``. The shipped
tokenizer is rebuilt by ``packages/summarization/tools/tokenizer.py`` (not part of the package).
"""

__version__ = "0.1.0"
