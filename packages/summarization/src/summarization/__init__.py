"""Dialogue summarization (DialogSum) with BART / T5 on the core engine, with ROUGE that works for
English and Korean.

Modules: ``config`` (the config tree), ``data`` (reading, checks, tokenising, batching),
``model`` (loading, from-scratch BART, freezing), ``metrics`` (ROUGE), ``task`` (the engine's
Task), ``cli`` (train, evaluate, predict, score, lead3), ``tokenizer_build`` (the shipped
tokenizer).
Each runs a self-check with ``python -m summarization.<module>``.
"""

__version__ = "0.1.0"
