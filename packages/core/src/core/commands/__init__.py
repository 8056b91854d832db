"""The argparse halves of the console scripts: ``train`` (and ``--dry-run``), the model commands,
``infer`` (declared by a task as an ``InferSpec``), ``new-task``, and the launcher that dispatches
``train`` / ``evaluate`` / ``infer`` / ``sweep`` to the task asked for. Nothing in core imports
this layer.
"""

from core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "estimate": (
            "autocast_bytes checkpointing compute_bytes format_report gathered_unit_bytes "
            "gpu_verdict largest_unit layer_activation_bytes logits_bytes memory_report on "
            "optimizer_bytes setup_lines shard_ranks shipped_architectures shipped_config "
            "stack_activation_bytes trained_report trained_state"
        ),
        "infer": (
            "InferSpec add_device_argument add_sampling_arguments infer_command "
            "prompt_truncation read_prompt_rows sampling_settings trained_setting"
        ),
        "launcher": "ENV_VAR installed_tasks",
        "merge": (
            "Loaded MergeSpec check_not_quantized_checkpoint merge_and_check merge_command "
            "merge_dtype"
        ),
        "model_io": (
            "emit_rows inference_device inference_dtype model_parser removed_if_half_made"
        ),
        "spec": "EvaluateSpec TaskSpec check_helps main",
        "train": (
            "add_model_arguments add_out_arguments check_model_dir config_for_model model_owner "
            "parse_model_command parse_train_args run_of_model train_command user_errors_exit_2"
        ),
    },
)
