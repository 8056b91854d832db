"""summarization: dialogue summarization (DialogSum) with BART / T5 on the core engine, with ROUGE
that works for English and Korean. The modules are those of every task package
(``docs/architecture.md``); the shipped tokenizer is rebuilt by
``packages/summarization/tools/tokenizer.py``.
"""

__version__ = "0.1.0"
