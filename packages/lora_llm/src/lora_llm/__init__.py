"""lora_llm: LoRA / QLoRA fine-tuning of small causal LLMs (train, infer, merge) on the core
engine."""

__version__ = "0.1.0"
