# shellcheck shell=bash
# Build and run the srun commands of a training job. Sourced after env.sh, then `run_training "$@"`.
#
#   1. node set-up: `uv sync --frozen --package $TASK` into $VENV_DIR, once per node when the venv
#      is node-local (LOCAL_SCRATCH), else once on the first node;
#   2. training: one task per GPU (or per CPU process in DEVICE=cpu mode) with srun; Fabric reads
#      ranks, nodes and the master address from the SLURM environment. The node and device counts
#      are passed from SLURM_NNODES / SLURM_NTASKS_PER_NODE.
#
# DRY_RUN=1 prints each command (shell-quoted) instead of running it.
#
# Sweeps (`sweep --slurm`, core/sweep.py) submit the task's train.sbatch as one job array with
# SWEEP_ARGS_DIR set: array task i appends the arguments in $SWEEP_ARGS_DIR/i.args (one per line:
# the point's key=value overrides and run.dir=<its folder>) to the script's own, so a requeued task
# resumes its own point folder.

_run() {
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        printf '%q ' "$@"; printf '\n'
    else
        "$@"
    fi
}

# pyxis / enroot flags, the users' form: image, mounts (repo and scratch always), no home mount,
# writable container, workdir.
container_flags() {
    CONTAINER_ARGS=()
    [[ -z "${CONTAINER_IMAGE:-}" ]] && return 0
    local mounts="$REPO_DIR:$REPO_DIR"
    [[ -n "${LOCAL_SCRATCH:-}" ]] && mounts="$mounts,$LOCAL_SCRATCH:$LOCAL_SCRATCH"
    [[ -n "${CONTAINER_MOUNTS:-}" ]] && mounts="$mounts,$CONTAINER_MOUNTS"
    CONTAINER_ARGS=(
        "--container-image=$CONTAINER_IMAGE"
        "--container-mounts=$mounts"
        "--no-container-mount-home"
        "--container-writable"
        "--container-workdir=${CONTAINER_WORKDIR:-$REPO_DIR}"
    )
}

node_setup() {
    [[ "${SKIP_SYNC:-0}" == "1" ]] && return 0
    local uv="${UV:-uv}"
    if [[ "${DRY_RUN:-0}" != "1" && -z "${CONTAINER_IMAGE:-}" ]] && ! command -v "$uv" >/dev/null; then
        echo "error: uv is not on PATH on $(hostname); install it (pip install --user uv) or set UV=/path/to/uv" >&2
        exit 2
    fi
    # --inexact keeps other workspace members in a shared venv; a per-task venv is synced exactly.
    local sync=("$uv" sync --frozen --package "$TASK" --directory "$REPO_DIR")
    [[ "$VENV_DIR" == "$REPO_DIR/.venv" ]] && sync+=(--inexact)
    if [[ -n "${LOCAL_SCRATCH:-}" || -n "${CONTAINER_IMAGE:-}" ]]; then
        _run srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" "${sync[@]}"
    else
        _run "${sync[@]}"
    fi
}

train_command() {
    TRAIN_ARGS=(
        "trainer.num_nodes=${SLURM_NNODES:-1}"
        "trainer.devices=${SLURM_NTASKS_PER_NODE:-1}"
    )
    if [[ "$DEVICE" == "cpu" ]]; then
        TRAIN_ARGS+=("trainer.accelerator=cpu" "trainer.strategy=ddp")
    else
        TRAIN_ARGS+=("trainer.accelerator=gpu")
    fi
}

# The arguments of this array task's sweep point (none outside a sweep).
sweep_point_args() {
    POINT_ARGS=()
    [[ -z "${SWEEP_ARGS_DIR:-}" ]] && return 0
    if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        echo "error: SWEEP_ARGS_DIR is set but this is not an array job; submit sweeps with 'sweep --slurm'" >&2
        exit 2
    fi
    local file="$SWEEP_ARGS_DIR/$SLURM_ARRAY_TASK_ID.args"
    if [[ ! -f "$file" ]]; then
        echo "error: no arguments for array task $SLURM_ARRAY_TASK_ID in $file; was the sweep folder moved?" >&2
        exit 2
    fi
    mapfile -t POINT_ARGS < "$file"
}

run_training() {
    container_flags
    sweep_point_args
    node_setup
    train_command
    export CORE_TASK="$TASK"   # the shared `train` command runs this task's trainer
    echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID:-?}_$SLURM_ARRAY_TASK_ID)} (restart ${SLURM_RESTART_COUNT:-0}) task $TASK on ${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-1} task(s), device $DEVICE" >&2
    # User arguments come last so they override the defaults above (e.g. trainer.strategy=fsdp);
    # a sweep point's own arguments after them.
    _run srun --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" "$VENV_DIR/bin/train" "${TRAIN_ARGS[@]}" "$@" "${POINT_ARGS[@]}"
}
