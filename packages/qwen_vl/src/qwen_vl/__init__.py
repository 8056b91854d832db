"""qwen_vl: Qwen2.5-VL fine-tuning on the core engine (data, labels, FSDP recipe, counting task).

Commands: ``make-data``, ``train``, ``evaluate``, ``infer`` (see ``qwen_vl.cli``).
"""

__version__ = "0.1.0"
