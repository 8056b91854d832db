"""summarization task package (work in progress)."""

__version__ = "0.1.0"
