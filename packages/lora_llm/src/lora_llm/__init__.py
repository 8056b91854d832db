"""lora_llm: LoRA / QLoRA fine-tuning of small causal LLMs (train, evaluate, infer, prepare,
merge) on the core engine.

Modules, as in every task package: ``config`` (the config tree, the presets folder and default),
``data`` (records, templates, encoding, packing), ``model`` (base, quantization, adapter),
``task`` (the engine's Task, evaluation hooks included), ``memory`` (the dry-run estimate),
``cli`` (``SPEC``, the task's declaration, and its commands).
Each runs a self-check with ``python -m lora_llm.<module>``.
"""

__version__ = "0.1.0"
