"""The toy task and the helpers of the test suites. ``python -m core.testing train ...`` trains the
toy task. Nothing in core imports this package outside a self-check.
"""

from core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "checks": "QUIET check_config refused trained_briefly",
        "toy": (
            "CountingData ToyConfig ToyTask child_env final_weights max_weight_diff read_jsonl "
            "script_result train train_losses wait_for_step"
        ),
        "workspace": "LAUNCH_PREFIXES clean_env copy_workspace",
    },
)
