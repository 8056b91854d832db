"""From the ``trainer`` config to a Fabric object: machine checks, precision, strategy.

Everything here runs before any process is launched or any file is written, so a config this
machine cannot run (a GPU asked for where there is none, ``trainer.devices=0``, DeepSpeed on the
CPU, an unknown strategy) stops with a :class:`core.errors.ConfigError` that names the key.

Self-check: ``python -m core.parallel.strategy``.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric import Fabric

from core.config.schema import TrainConfig, TrainerConfig
from core.errors import ConfigError
from core.parallel.seeding import set_deterministic

STRATEGIES = (
    "auto",
    "ddp",
    "fsdp",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_3",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3_offload",
)
"""Values of ``trainer.strategy``."""


def cuda_requested(tc: TrainerConfig) -> bool:
    """Whether the run will use CUDA devices (``auto`` picks them when there are any)."""
    return tc.accelerator in ("cuda", "gpu") or (
        tc.accelerator == "auto" and torch.cuda.is_available()
    )


def parse_devices(devices: int | str) -> int | None:
    """Processes per node asked for by ``trainer.devices`` (None for ``auto`` / ``-1``).

    Raises:
        ConfigError: 0, a negative number other than -1, or text that is not ``auto``, a number or
            a list of device indices such as ``0,1``.
    """
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return None
    if text.lstrip("[").rstrip("]").replace(",", "").replace(" ", "").isdigit() and (
        "," in text or "[" in text
    ):
        return len([x for x in text.strip("[]").split(",") if x.strip()])
    try:
        count = int(text)
    except ValueError:
        raise ConfigError(
            f"Config key 'trainer.devices' = {devices!r} is not a device count: use a number (2), "
            "auto, or GPU indices (0,1)."
        ) from None
    if count < 1:
        raise ConfigError(
            f"Config key 'trainer.devices' = {count}: at least one device is needed (use 1 for a "
            "single process, auto for all GPUs)."
        )
    return count


def check_machine(tc: TrainerConfig) -> None:
    """Refuse ``trainer`` settings this machine cannot run, naming the key.

    Raises:
        ConfigError: with what is wrong and what to use instead.
    """
    count = parse_devices(tc.devices)
    if tc.accelerator in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"Config key 'trainer.accelerator' = {tc.accelerator}, but this machine has no "
                "CUDA GPU "
                "(torch.cuda.is_available() is False). Use trainer.accelerator=cpu or auto, or "
                "run on a GPU node."
            )
        if count is not None and "," not in str(tc.devices) and count > torch.cuda.device_count():
            raise ConfigError(
                f"Config key 'trainer.devices' = {count}, but this machine has "
                f"{torch.cuda.device_count()} GPU(s)."
            )
    if tc.accelerator == "mps" and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    ):
        raise ConfigError(
            "Config key 'trainer.accelerator' = mps, but this machine has no Apple GPU; use cpu "
            "or auto."
        )
    if tc.strategy not in STRATEGIES:
        raise ConfigError(
            f"Config key 'trainer.strategy' = {tc.strategy!r} is unknown; use one of "
            f"{', '.join(STRATEGIES)}."
        )
    if tc.strategy.startswith("deepspeed"):
        if not cuda_requested(tc):
            raise ConfigError(
                f"Config key 'trainer.strategy' = {tc.strategy}: DeepSpeed runs on CUDA GPUs only "
                "(Fabric refuses it on the "
                "CPU). Use trainer.strategy=ddp or fsdp here."
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"Config key 'trainer.strategy' = {tc.strategy} needs DeepSpeed: install "
                "core[deepspeed] "
                "(uv sync --extra deepspeed), or use trainer.strategy=ddp / fsdp."
            )
    if tc.offload_activations and not cuda_requested(tc):
        raise ConfigError(
            "Config key 'trainer.offload_activations' = true moves saved activations from GPU to "
            "CPU memory; on the CPU they are in CPU memory already: set it to false (or run on "
            "a GPU)."
        )
    if tc.num_nodes > 1 and not any(
        v in os.environ for v in ("SLURM_NNODES", "WORLD_SIZE", "LSB_JOBID")
    ):
        raise ConfigError(
            f"Config key 'trainer.num_nodes' = {tc.num_nodes}, but this process was not started "
            "by a cluster launcher "
            "(no SLURM job, no torchrun): submit it with the package's slurm/train.sbatch, or use "
            "trainer.num_nodes=1."
        )


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` -> ``bf16-mixed`` on a bfloat16-capable GPU, else ``32-true``; checks the rest.

    Raises:
        ConfigError: 16-bit float precision on the CPU, or bfloat16 on a GPU without it.
    """
    cuda = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if precision == "auto":
        return "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"
    if precision.startswith("16") and not cuda:
        raise ConfigError(
            f"Config key 'trainer.precision' = {precision} needs a CUDA GPU; on the CPU use "
            "bf16-mixed, bf16-true or 32-true."
        )
    if precision.startswith("bf16") and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"Config key 'trainer.precision' = {precision}: this GPU has no bfloat16; use "
            "16-mixed or 32-true."
        )
    return precision


def build_strategy(
    cfg: TrainConfig, wrap_classes: Callable[[], set[type[torch.nn.Module]]] | None, precision: str
) -> Any:
    """The Fabric strategy for ``trainer.strategy``.

    Args:
        cfg: the task's root config.
        wrap_classes: gives the task's FSDP block classes (``Task.fsdp_wrap_classes``; called for
        FSDP only).
        precision: the resolved precision.

    Returns:
        A strategy object or name for ``Fabric(strategy=...)``.
    """
    from datetime import timedelta

    from lightning.fabric.utilities.imports import _IS_INTERACTIVE

    name = cfg.trainer.strategy
    tc = cfg.trainer
    if name == "auto" and processes_per_node(tc) * tc.num_nodes > 1 and not _IS_INTERACTIVE:
        name = "ddp"  # what Fabric picks itself, built here so that it gets trainer.dist_timeout
    if name == "ddp":
        from lightning.fabric.strategies import DDPStrategy

        return DDPStrategy(
            find_unused_parameters=tc.find_unused_parameters,
            timeout=timedelta(seconds=tc.dist_timeout),
        )
    if name == "fsdp":
        from core.parallel import fsdp

        reason = fsdp.unsupported_reason(cfg, "cuda" if cuda_requested(cfg.trainer) else "cpu")
        if reason:
            raise ConfigError(reason)
        return fsdp.build_strategy(cfg, wrap_classes() if wrap_classes else set(), precision)
    return name


def processes_per_node(tc: TrainerConfig) -> int:
    """How many processes Fabric will start on this node: ``trainer.devices``, with ``auto`` (or
    ``-1``) meaning every visible GPU, or one process on the CPU."""
    count = parse_devices(tc.devices)
    if count is None:
        return max(1, torch.cuda.device_count()) if cuda_requested(tc) else 1
    return count


def choose_master_port() -> None:
    """Set ``MASTER_PORT`` for a local multi-process launch, from outside the kernel's ephemeral
    port range.

    Lightning otherwise asks the kernel for a free port (``bind(0)``) and closes it before rank 0
    listens on it: a port from the ephemeral range can meanwhile be taken by an outgoing connection
    (gloo opens many), and the run dies with ``EADDRINUSE``. Ports 20000-29999 are never handed out
    as ephemeral ports by default; a random one that binds now is used. Clusters (SLURM, torchrun)
    choose their own port and are left alone.
    """
    import random
    import socket

    if (
        "MASTER_PORT" in os.environ
        or "WORLD_SIZE" in os.environ
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    ):
        return
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    for _ in range(50):
        port = rng.randrange(20000, 30000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        os.environ["MASTER_PORT"] = str(port)
        return


# What Lightning's launcher writes into the launching process's environment for its ranks.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def launch_environment() -> Iterator[None]:
    """Give the process back the launch variables it had before a run.

    Fabric's launcher sets ``LOCAL_RANK``, ``WORLD_SIZE`` and the rest in the launching process
    itself (also for one DDP / FSDP process). Left behind, they make every process it starts
    later (a 2-rank run from a notebook or a test, an sbatch job) believe it is an already
    launched rank 0 of a 1-process world: it never spawns its other ranks and waits for them
    forever.
    """
    before = {key: os.environ.get(key) for key in LAUNCH_VARIABLES}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        # A gloo worker thread drops its finished collective's tensors after the caller's wait()
        # returned; a tensor made in Python needs the GIL for that. Should the interpreter be
        # finalizing by then, Python ends that C++ thread (pthread_exit), which aborts the
        # process: "terminate called without an active exception". Leaving the GIL free for a
        # moment lets such a thread finish first.
        time.sleep(0.1)


def destroy_process_group_at_exit() -> None:
    """Have this process tear down its default process group when it exits (once per process,
    however often it is called).

    Lightning does this only for NCCL. A gloo group (every CPU run, and the CPU side of GPU runs)
    left to the interpreter's finalization now and then aborts the process with "terminate
    called without an active exception" after its work is done (pytorch/pytorch#190489;
    measured here: 2 of 80 two-rank evaluations exited with SIGABRT after printing their
    metrics). :func:`build_fabric` calls it; a script that builds its own ``Fabric`` should too.
    """
    atexit.unregister(_destroy_process_group)  # atexit keeps one entry per registration
    atexit.register(_destroy_process_group)


class LaunchedRankEnded(RuntimeError):
    """Raised in rank 0's main thread (by :func:`watch_launched_ranks`) when a rank it launched
    ended with an error while rank 0 was outside any collective."""


# The signal that carries Lightning's "a launched rank ended" from its watcher thread to the
# main thread. SIGUSR1 / SIGTERM / SIGINT are core.engine.signals.StopSignal's.
RANK_ENDED_SIGNAL = signal.SIGUSR2


class _RankWatch:
    """State shared by rank 0's main thread and Lightning's watcher thread (see
    :func:`watch_launched_ranks`)."""

    def __init__(self, observer: Any, grace: float) -> None:
        self.observer = observer
        self.original = observer._terminate_all
        self.grace = grace
        self.lock = threading.Lock()
        self.armed = True  # False once the main thread handles a lost rank or leaves training
        self.previous: Any = signal.getsignal(RANK_ENDED_SIGNAL)

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.armed:  # a signal sent just before the main thread stood down is dropped
            raise LaunchedRankEnded("a rank launched by this process ended")

    def terminate_all(self) -> None:
        """Replaces Lightning's ``_terminate_all`` (SIGKILL every rank, rank 0 included, no
        message): tell the main thread instead, which ends the other ranks itself
        (:func:`release_child_ranks`); kill them all only if it is still training after
        ``grace`` seconds (stuck in C code), as Lightning does, so that no process is left."""
        with self.lock:
            if not self.armed:
                return  # the main thread handles it (or is past training and ends them itself)
            signal.pthread_kill(threading.main_thread().ident, RANK_ENDED_SIGNAL)
        time.sleep(self.grace)
        with self.lock:
            if self.armed:
                self.original()


_rank_watch: _RankWatch | None = None


def watch_launched_ranks(fabric: Fabric, grace: float = 60.0) -> None:
    """On rank 0 of a local multi-process launch, right after ``fabric.launch()``: have a launched
    rank's failure raise :class:`LaunchedRankEnded` in the main thread (wherever it is: a long
    step, validation, a checkpoint write) instead of Lightning's silent SIGKILL of this process a
    few seconds later. Undo with :func:`unwatch_launched_ranks`. Does nothing elsewhere (other
    ranks, SLURM / torchrun, one process, a thread other than the main one).
    """
    global _rank_watch
    launcher = getattr(fabric.strategy, "launcher", None)
    if (
        _rank_watch is not None
        or not getattr(launcher, "procs", None)
        or threading.current_thread() is not threading.main_thread()
    ):
        return
    # Lightning keeps no reference to its watcher thread (subprocess_script
    # _launch_process_observer); it is found by its name and the list it polls.
    observer = next(
        (
            t
            for t in threading.enumerate()
            if t.name == "child-process-observer"
            and getattr(t, "_child_processes", None) is launcher.procs
            and hasattr(t, "_terminate_all")
        ),
        None,
    )
    if observer is None:
        return
    watch = _RankWatch(observer, grace)
    signal.signal(RANK_ENDED_SIGNAL, watch.on_signal)
    observer._terminate_all = watch.terminate_all
    _rank_watch = watch


def stand_down_rank_watch() -> None:
    """The main thread handles a lost rank now: no further :class:`LaunchedRankEnded`, and
    Lightning's watcher no longer kills this process."""
    if _rank_watch is not None:
        with _rank_watch.lock:
            _rank_watch.armed = False


def unwatch_launched_ranks() -> None:
    """Undo :func:`watch_launched_ranks` (idempotent): the previous signal handler returns."""
    global _rank_watch
    watch, _rank_watch = _rank_watch, None
    if watch is None:
        return
    with watch.lock:
        watch.armed = False
    signal.signal(RANK_ENDED_SIGNAL, watch.previous)


def release_child_ranks(fabric: Fabric, grace: float = 15.0) -> dict[int, int | None]:
    """After a peer rank was lost: take this process's launched ranks back from Lightning, let
    them end by themselves for up to ``grace`` seconds, then kill the rest (they are in a broken
    process group: nothing of theirs can be saved), so that no rank is left behind.

    Only rank 0 of a local multi-process launch has launched ranks; under SLURM or torchrun the
    cluster ends its tasks. Lightning's watcher thread of these ranks kills *this* process
    (SIGKILL, no message, no summary) a few seconds after it finds one of them gone; emptying its
    list stops that.

    Returns:
        ``{local rank: exit code}`` of the launched ranks, as found before waiting (None: it was
        still running), so the caller can name the rank that died.
    """
    import subprocess

    stand_down_rank_watch()
    launcher = getattr(fabric.strategy, "launcher", None)
    procs = list(getattr(launcher, "procs", None) or [])
    if not procs:
        return {}
    launcher.procs.clear()  # the very list Lightning's watcher thread polls
    found = {rank: proc.poll() for rank, proc in enumerate(procs, start=1)}
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return found


def build_fabric(
    cfg: TrainConfig,
    wrap_classes: Callable[[], set[type[torch.nn.Module]]] | None = None,
    training: bool = True,
) -> Fabric:
    """A Fabric object for ``cfg.trainer`` (not launched yet), after the machine checks.

    Turns on deterministic algorithms first when asked, since cuBLAS reads its setting when CUDA
    starts.

    Args:
        cfg: the task's root config.
        wrap_classes: gives the task's FSDP block classes (``Task.fsdp_wrap_classes``).
        training: whether an optimizer will step (then ``optim.name`` must suit the strategy);
            False for evaluation, which never builds one.

    Raises:
        ConfigError: settings this machine cannot run.
    """
    tc = cfg.trainer
    check_machine(tc)
    if training:
        from core.nn.optim import check_strategy

        check_strategy(cfg)
    precision = resolve_precision(tc.precision, tc.accelerator)
    if "SLURM_JOB_ID" not in os.environ:
        # Lightning warns on every machine that merely has srun installed; outside a job it is
        # noise.
        warnings.filterwarnings("ignore", message="The `srun` command is available")
    set_deterministic(tc.deterministic)
    if processes_per_node(tc) * tc.num_nodes > 1:  # a single process needs no port at all
        choose_master_port()
    destroy_process_group_at_exit()
    plugins = []
    if tc.strategy in ("auto", "ddp"):
        # Checkpoint files go straight into the checkpoint's own folder, never via $TMPDIR
        # (FSDP2 writes its shards in place itself; Fabric refuses a plugin for it and DeepSpeed).
        from core.parallel.checkpoint import DirectCheckpointIO

        plugins.append(DirectCheckpointIO())
    try:
        return Fabric(
            accelerator=tc.accelerator,
            devices=tc.devices,
            num_nodes=tc.num_nodes,
            strategy=build_strategy(cfg, wrap_classes, precision),
            precision=precision,
            plugins=plugins or None,
        )
    except (
        ValueError,
        RuntimeError,
        TypeError,
    ) as err:  # Fabric's own checks, e.g. an impossible device list
        raise ConfigError(
            "The trainer settings cannot run here "
            f"(trainer.accelerator/devices/strategy/precision): {err}"
        ) from None


def is_sharded(fabric: Fabric) -> bool:
    """Whether parameters are sharded across ranks (FSDP2, DeepSpeed), so ``generate`` must run
    in lockstep on every rank (``synced_gpus``) and replica checksums do not apply."""
    from lightning.fabric.strategies import DeepSpeedStrategy, FSDPStrategy

    from core.parallel.fsdp import FSDP2Strategy

    return fabric.world_size > 1 and isinstance(
        fabric.strategy, (FSDP2Strategy, FSDPStrategy, DeepSpeedStrategy)
    )


if __name__ == "__main__":  # self-check: python -m core.parallel.strategy
    for bad in (
        {"devices": 0},
        {"accelerator": "cuda"} if not torch.cuda.is_available() else {"devices": 0},
        {"strategy": "deepspeed_stage_2", "accelerator": "cpu"},
        {"strategy": "fsdp1"},
    ):
        try:
            check_machine(TrainerConfig(**bad))
        except ConfigError as err:
            print(f"{bad} -> {err}")
        else:
            raise AssertionError(f"{bad} must be refused")
    print("precision auto ->", resolve_precision("auto", "auto"))
    print("core.parallel.strategy: ok")
