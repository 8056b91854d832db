"""A real single-node Slurm cluster for the sbatch tests (Debian's slurm-wlm and munge).

The ``slurm_cluster`` fixture installs the packages when they are missing (root + apt-get), writes
a private config (own ports, state and spool folders in a temp folder, munge socket and key of
its own), starts munged, slurmctld and slurmd in the foreground as child processes, waits for the
node to be idle, and at the end cancels its jobs and stops exactly the daemons it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


@dataclass
class Cluster:
    """A running test cluster: use :meth:`env` for slurm commands."""

    root: Path
    conf: Path
    partition: str = "debug"

    def env(self, **extra: str) -> dict[str, str]:
        # The jobs' ranks find each other through SLURM's variables: nothing of this process's
        # own launch (a MASTER_PORT of an earlier in-process run) may leak into them.
        launch = (
            "SLURM_",
            "MASTER_PORT",
            "MASTER_ADDR",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "NODE_RANK",
            "CORE_TASK",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(launch)}
        env.update({"SLURM_CONF": str(self.conf), **extra})
        return env

    def run(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            list(args), capture_output=True, text=True, env=self.env(), timeout=60
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr}")
        return done.stdout

    def job_state(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(part.split("=", 1) for part in out.split() if "=" in part)

    def wait(
        self,
        job_id: str,
        states: tuple[str, ...] = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        ),
        timeout: float = 600,
    ) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job_state(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(
            f"job {job_id} not in {states} after {timeout} s: {self.job_state(job_id)}"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install() -> None:
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", *PACKAGES], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:  # stale package lists on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", *PACKAGES], capture_output=True, text=True, env=env
        )
    if done.returncode != 0:
        pytest.skip(f"could not install Slurm: {done.stderr[-500:]}")


def _write_config(root: Path) -> Path:
    host = socket.gethostname()
    cpus = os.cpu_count() or 2
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=finetune-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile={root}/state/slurmctld.pid
SlurmdPidFile={root}/state/slurmd.pid
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    )
    return conf


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    _install()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = _write_config(root)
    cluster = Cluster(root=root, conf=conf)
    env = cluster.env()
    logs = open(root / "log" / "daemons.out", "w")
    daemons = [
        subprocess.Popen(
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={root}/munge/munge.socket",
                f"--pid-file={root}/munge/munged.pid",
                f"--log-file={root}/munge/munged.log",
                f"--seed-file={root}/munge/seed",
            ],
            stdout=logs,
            stderr=subprocess.STDOUT,
            env=env,
        )
    ]
    time.sleep(0.5)
    daemons.append(
        subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(conf)],
            stdout=logs,
            stderr=subprocess.STDOUT,
            env=env,
        )
    )
    time.sleep(0.5)
    daemons.append(
        subprocess.Popen(
            ["slurmd", "-D", "-f", str(conf)], stdout=logs, stderr=subprocess.STDOUT, env=env
        )
    )
    try:
        deadline = time.time() + 60
        while True:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env
            ).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"Slurm node not ready: {out!r}; logs in {root / 'log'}")
            time.sleep(0.5)
        yield cluster
    finally:
        subprocess.run(
            ["scancel", "--user", os.environ.get("USER", "root")], env=env, capture_output=True
        )
        time.sleep(1)
        for proc in reversed(daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(daemons):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logs.close()
