"""``debug.shapes``: forward hooks that log each module's input and output tensor shapes once.

Example line in ``train.log``::

    shapes | model.encoder.layers.0.self_attn (BartAttention): in [hidden_states (2, 37, 64)
    float32] -> out [(2, 37, 64) float32, None]

Self-check: ``python -m core.nn.debug``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def describe(value: Any, depth: int = 0) -> str:
    """A short text of the tensors inside ``value``: shapes and dtypes, recursively.

    Args:
        value: a tensor, a sequence / mapping / HF ``ModelOutput`` of tensors, or anything else.

    Returns:
        E.g. ``(2, 16) int64`` or ``[logits (2, 16, 100) float32, None]``.
    """
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if depth > 2:
        return "..."
    if isinstance(value, Mapping):
        items = [f"{k} {describe(v, depth + 1)}" for k, v in value.items() if v is not None]
        return "[" + ", ".join(items) + "]"
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "[" + ", ".join(describe(v, depth + 1) for v in value) + "]"
    return type(value).__name__ if value is not None else "None"


class ShapeLogger:
    """Registers forward hooks on every submodule and logs shapes for the first forward call.

    Use as a context manager around the first training step, or call :meth:`remove`.

    Args:
        model: the (unwrapped) model.
        logger: where lines go (default: this module's logger).
        max_modules: stop logging after this many modules (huge models).
    """

    def __init__(
        self, model: nn.Module, logger: logging.Logger | None = None, max_modules: int = 2000
    ) -> None:
        self.logger = logger or log
        self.max_modules = max_modules
        self.seen: set[str] = set()
        self.lines: list[str] = []
        self._handles = [
            module.register_forward_hook(self._hook(name or type(model).__name__), with_kwargs=True)
            for name, module in model.named_modules()
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if name in self.seen or len(self.seen) >= self.max_modules:
                return
            self.seen.add(name)
            inputs = describe(
                list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
            )
            line = (
                f"shapes | {name} ({type(module).__name__}): in {inputs} -> out {describe(output)}"
            )
            self.lines.append(line)
            self.logger.info(line)

        return hook

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ShapeLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


if __name__ == "__main__":  # self-check: python -m core.nn.debug
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    class TwoLayer(nn.Module):
        """A 2-layer MLP: (batch, 8) -> (batch, 3)."""

        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(8, 16)
            self.out = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.hidden(x)))

    net = TwoLayer()
    with ShapeLogger(net) as shapes:
        net(torch.randn(4, 8))
        net(torch.randn(4, 8))  # second call: nothing more logged
    assert len(shapes.lines) == 3, shapes.lines
    assert "(4, 16)" in shapes.lines[0]
    print("core.nn.debug: ok")
