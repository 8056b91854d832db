"""qwen_vl task package (work in progress)."""

__version__ = "0.1.0"
