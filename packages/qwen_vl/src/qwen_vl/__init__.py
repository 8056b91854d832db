"""qwen_vl: Qwen2.5-VL fine-tuning on the core engine (data, labels, FSDP recipe, counting task).

Modules, as in every task package: ``config`` (the config tree, the presets folder and default),
``data`` (conversations, images, labels), ``model`` (loading, tiny model, LoRA, export),
``task`` (the engine's Task, evaluation hooks included), ``memory`` (the dry-run estimate),
``cli`` (``SPEC``, the task's declaration, and its commands: make-data, train, evaluate, infer);
and ``metrics``, ``synth`` (the counting data). Each runs a self-check with ``python -m
qwen_vl.<module>``. The tiny processor in ``assets/`` is rebuilt by
``packages/qwen_vl/tools/tiny_processor.py`` (not part of the package).
"""

__version__ = "0.1.0"
