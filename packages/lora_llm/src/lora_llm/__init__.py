"""lora_llm: LoRA / QLoRA fine-tuning of small causal LLMs (train, evaluate, infer, prepare,
merge) on the core engine, with the modules of every task package (``docs/architecture.md``).
"""

__version__ = "0.1.0"
