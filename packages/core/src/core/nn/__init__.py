"""Torch building blocks without engine state: the token loss, optimizers and schedules, padding,
fused kernels and compilation, shape debugging, and what every task does with a transformers
model (dtype choice, activation checkpointing, block classes, parameter counts).
"""

from core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "acceleration": "apply_liger_kernel compile_blocks offload_saved_tensors",
        "debug": "ShapeLogger",
        "loss": "IGNORE_INDEX check_plain_logits head_loss linear_cross_entropy shift_targets",
        "models": (
            "DTYPES auto_dtype block_classes check_dtypes cuda_dtype default_dtype "
            "enable_checkpointing liger_kernel parameter_counts precision_dtype real_numel "
            "transformers_errors_only"
        ),
        "optim": "Adafactor build_optimizer build_scheduler check_strategy parameter_groups",
        "padding": "length_mask pad_fields pad_rows",
        "peft_lora": "peft_lora_config",
    },
)
