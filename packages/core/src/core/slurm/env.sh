# shellcheck shell=bash
# Environment set-up shared by every task's train.sbatch. Sourced, not run.
#
# Input (environment; every one has a default):
#   TASK              workspace member to run (set by the task's sbatch script)
#   REPO_DIR          checkout of the workspace            (default: $SLURM_SUBMIT_DIR, else $PWD)
#   LOCAL_SCRATCH     node-local fast storage (NVMe). When set, the venv, the uv cache, the
#                     Triton cache and HF_HOME go there instead of the (slow, NFS) home / repo.
#   VENV_DIR          the virtual environment   (default: $LOCAL_SCRATCH/venv-$TASK, else $REPO_DIR/.venv)
#   UV_CACHE_DIR, HF_HOME, TRITON_CACHE_DIR, UV_LINK_MODE   respected when already set
#   SECRETS_FILE      KEY=VALUE file with HF_TOKEN / WANDB_API_KEY, readable only by you
#                     (default: ~/.config/finetune/secrets.env, used if it exists)
#   DEVICE            gpu (default) or cpu (test mode: DDP over gloo, one process per task)
#   CONTAINER_IMAGE   run inside a pyxis/enroot container (.sqsh file or image name)
#   CONTAINER_MOUNTS  extra mounts "src:dst[,src:dst]"; the repo and LOCAL_SCRATCH are always mounted
#   CONTAINER_WORKDIR working directory in the container (default: $REPO_DIR)
#   SKIP_SYNC=1       do not run `uv sync` (the venv is already complete)
#   DRY_RUN=1         print the commands instead of running them
#
# Secrets are never taken from command-line arguments (they would show in `ps`, job records and
# logs) and never echoed: only from the environment or SECRETS_FILE.

: "${TASK:?TASK must name the workspace member to run}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
export REPO_DIR
DEVICE="${DEVICE:-gpu}"

# Outside the workspace (task wheels installed into your own venv) there is nothing to sync.
if [[ ! -f "$REPO_DIR/uv.lock" ]]; then
    SKIP_SYNC=1
    VENV_DIR="${VENV_DIR:-${VIRTUAL_ENV:-}}"
    if [[ -z "$VENV_DIR" ]]; then
        echo "error: $REPO_DIR is not the workspace (no uv.lock); set VENV_DIR to the venv that has the task installed" >&2
        exit 2
    fi
fi
if [[ -n "${LOCAL_SCRATCH:-}" ]]; then
    mkdir -p "$LOCAL_SCRATCH"
    VENV_DIR="${VENV_DIR:-$LOCAL_SCRATCH/venv-$TASK}"
    export UV_CACHE_DIR="${UV_CACHE_DIR:-$LOCAL_SCRATCH/uv-cache}"
    export HF_HOME="${HF_HOME:-$LOCAL_SCRATCH/huggingface}"
fi
VENV_DIR="${VENV_DIR:-$REPO_DIR/.venv}"
export VENV_DIR
# Triton compiles kernels into ~/.triton by default: on NFS that is slow and racy between nodes.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${LOCAL_SCRATCH:-/tmp/${USER:-$(id -un)}}/triton-cache}"
export UV_PROJECT_ENVIRONMENT="$VENV_DIR"
export PYTHONUNBUFFERED=1

# Hard links cannot cross file systems; follow the users' fix and symlink from the venv into the
# cache when the two live on different file systems (unless UV_LINK_MODE is already chosen).
_same_fs() {
    local a b
    a=$(stat -c %d "$1" 2>/dev/null) || return 1
    b=$(stat -c %d "$2" 2>/dev/null) || return 1
    [[ "$a" == "$b" ]]
}
if [[ -z "${UV_LINK_MODE:-}" && -n "${UV_CACHE_DIR:-}" ]]; then
    mkdir -p "$UV_CACHE_DIR" "$(dirname "$VENV_DIR")"
    if ! _same_fs "$UV_CACHE_DIR" "$(dirname "$VENV_DIR")"; then
        export UV_LINK_MODE=symlink
    fi
fi

# --- secrets -------------------------------------------------------------------------------
_xtrace_was_on=0
[[ $- == *x* ]] && _xtrace_was_on=1 && set +x   # never print secrets, even under bash -x
SECRETS_FILE="${SECRETS_FILE:-$HOME/.config/finetune/secrets.env}"
if [[ -f "$SECRETS_FILE" ]]; then
    _mode=$(stat -c %a "$SECRETS_FILE")
    if [[ "${_mode: -2}" != "00" ]]; then
        echo "error: $SECRETS_FILE is readable by other users (mode $_mode); run: chmod 600 '$SECRETS_FILE'" >&2
        exit 2
    fi
    # Parse KEY=VALUE lines for the known keys only; the file is never executed.
    while IFS='=' read -r _key _value; do
        case "$_key" in
            HF_TOKEN|HUGGING_FACE_HUB_TOKEN|WANDB_API_KEY)
                _value="${_value%\"}"; _value="${_value#\"}"; _value="${_value%\'}"; _value="${_value#\'}"
                [[ -z "${!_key:-}" ]] && export "$_key=$_value" ;;
        esac
    done < "$SECRETS_FILE"
    unset _key _value _mode
fi
# The users' old scripts called it WANDB_KEY.
if [[ -z "${WANDB_API_KEY:-}" && -n "${WANDB_KEY:-}" ]]; then export WANDB_API_KEY="$WANDB_KEY"; fi
unset WANDB_KEY
(( _xtrace_was_on )) && set -x
unset _xtrace_was_on

mkdir -p "$REPO_DIR/logs"
