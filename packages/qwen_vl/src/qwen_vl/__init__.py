"""qwen_vl: Qwen2.5-VL fine-tuning on the core engine, with the modules of every task package
(``config``, ``data``, ``model``, ``task``, ``memory``, ``cli``) and the counting task's
``metrics`` and ``synth``. The tiny processor in ``assets/`` is rebuilt by
``packages/qwen_vl/tools/tiny_processor.py``.
"""

__version__ = "0.1.0"
