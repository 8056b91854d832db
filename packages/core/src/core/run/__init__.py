"""What a run leaves on disk: the run folder and its lock, the manifest, logs and metrics, the
output guard, plots, free-space checks and the run record.
"""

from core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "folder": (
            "LOCK_NAME RUN_DIR_PATTERN RunDir RunLock STALE_SECONDS check_not_locked "
            "check_run_dir experiment_numbers is_run_folder latest_run_dir lock_state new_run_dir "
            "owner_dead read_lock resolve_run_dir run_task slurm_job_key"
        ),
        "logs": "LogProgress MetricsLogger read_metrics setup_logging transformers_quiet",
        "manifest": "build_manifest data_file_sha256 sha256_file",
        "outputs": "guard_file guard_folder mark_folder protected_kind write_jsonl write_text",
        "plots": "plot_curves",
        "storage": (
            "StorageError check_free_space check_writable storage_errors tree_bytes writable_cache"
        ),
    },
)
