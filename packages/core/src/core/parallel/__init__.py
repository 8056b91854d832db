"""How one job spreads over ranks: collectives, seeding, the Fabric strategy, FSDP2, and the atomic,
verified checkpoints written across the ranks.
"""

from core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "checkpoint": (
            "CKPT_PATTERN CheckpointCorrupt CheckpointInfo CheckpointManager checkpoint_shapes "
            "on_rank_zero read_checkpoint verify_checkpoint"
        ),
        "collectives": "broadcast_object gather_objects gather_records",
        "fsdp": (
            "FSDP2Strategy full_state_dict is_fsdp2 mixed_precision_dtypes parallelize "
            "resolve_wrap_classes"
        ),
        "seeding": "rng_state seed_all set_rng_state",
        "strategy": (
            "LAUNCH_VARIABLES LaunchedRankEnded STRATEGIES build_fabric check_machine "
            "destroy_process_group_at_exit is_sharded launch_environment parse_devices "
            "release_child_ranks resolve_precision stand_down_rank_watch unwatch_launched_ranks "
            "watch_launched_ranks"
        ),
    },
)
