"""A real single-node Slurm cluster for the sbatch tests (Debian's slurm-wlm and munge).

The ``slurm_cluster`` fixture installs the packages when they are missing (root + apt-get), writes
a private config (own ports, state and spool folders in a temp folder, munge socket and key of
its own), starts munged, slurmctld and slurmd in the foreground as child processes, waits for the
node to be idle, and at the end cancels its jobs and stops exactly the daemons it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
REPO = Path(__file__).resolve().parents[2]


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

    def task_env(self, workdir: Path, repo: Path = REPO, **extra: str) -> dict[str, str]:
        """The environment of a task's ``train.sbatch`` in CPU test mode from the checkout
        ``repo``, with ``workdir`` as home."""
        return self.env(
            REPO_DIR=str(repo),
            DEVICE="cpu",
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",
            HOME=str(workdir),
            **extra,
        )

    def submit_task(
        self,
        workdir: Path,
        task: str,
        options: list[str],
        train_args: list[str],
        repo: Path = REPO,
        **extra: str,
    ) -> str:
        """``sbatch <options> packages/<task>/slurm/train.sbatch -c tiny <train_args>`` of the
        checkout ``repo`` in CPU test mode, from ``workdir`` (logs in ``workdir/logs``, runs in
        ``workdir/runs``); returns the job id."""
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--chdir={workdir}",
                "--gres=none",
                "--cpus-per-task=1",
                f"--partition={self.partition}",
                *options,
                str(repo / "packages" / task / "slurm" / "train.sbatch"),
                "-c",
                "tiny",
                f"run.root={workdir / 'runs'}",
                "logger.progress_bar=false",
                *train_args,
            ],
            capture_output=True,
            text=True,
            env=self.task_env(workdir, repo, **extra),
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

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


# Slurm holds a requeued job until the job's credential has expired (``cred_expire``, 120 s by
# default): with this a USR1 -> requeue -> resume test waits 11 s for its second start instead of
# two minutes. It is also the lifetime of a step's credential, from srun to slurmd on the same
# machine: a few seconds are plenty.
CRED_EXPIRE_S = 10


def _config_text(root: Path, cluster: str, ctl_addr: str, per_node: bool) -> str:
    """The slurm.conf lines both test clusters share: slurmctld on this host at ``ctl_addr``,
    state, logs and munge under ``root``; with ``per_node`` each slurmd has its own pid file,
    spool folder and log (``%n``: the node's name)."""
    slurmd, spool = ("slurmd-%n", "spool/%n") if per_node else ("slurmd", "spool")
    return f"""ClusterName={cluster}
SlurmctldHost={socket.gethostname()}({ctl_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile={root}/state/slurmctld.pid
SlurmdPidFile={root}/state/{slurmd}.pid
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/{spool}
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/{slurmd}.log
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
"""


def _write_config(root: Path) -> Path:
    host = socket.gethostname()
    cpus = os.cpu_count() or 2
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = root / "slurm.conf"
    conf.write_text(
        _config_text(root, "finetune-test", "127.0.0.1", per_node=False)
        + f"""NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
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
    conf = _write_config(root)
    cluster = Cluster(root=root, conf=conf)
    env = cluster.env()
    logs = open(root / "log" / "daemons.out", "w")
    daemons = [_start_munge(root, logs, env)]
    try:
        daemons.append(_start_slurmctld(conf, logs, env))
        daemons.append(
            subprocess.Popen(
                ["slurmd", "-D", "-f", str(conf)], stdout=logs, stderr=subprocess.STDOUT, env=env
            )
        )
        _wait_idle(cluster, 1)
        yield cluster
    finally:
        _stop_all(cluster, daemons)
        logs.close()


def _start_munge(root: Path, logs, env: dict[str, str]) -> subprocess.Popen:
    """munged with a new key and its socket in ``root/munge``."""
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munged = subprocess.Popen(
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
    time.sleep(0.5)
    return munged


def _start_slurmctld(conf: Path, logs, env: dict[str, str]) -> subprocess.Popen:
    ctld = subprocess.Popen(
        ["slurmctld", "-D", "-i", "-f", str(conf)], stdout=logs, stderr=subprocess.STDOUT, env=env
    )
    time.sleep(0.5)
    return ctld


def _wait_idle(cluster: Cluster, count: int) -> None:
    """Wait until the cluster's ``count`` nodes are up."""
    deadline = time.time() + 60
    while True:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).split()
        if len(out) == count and all(s in ("idle", "mix", "alloc") for s in out):
            return
        if time.time() > deadline:
            raise RuntimeError(f"Slurm nodes not ready: {out!r}; logs in {cluster.root / 'log'}")
        time.sleep(0.5)


def _stop_all(cluster: Cluster, daemons: list[subprocess.Popen]) -> None:
    """Cancel the cluster's jobs, then stop ``daemons`` (the last started first)."""
    subprocess.run(
        ["scancel", "--user", os.environ.get("USER", "root")],
        env=cluster.env(),
        capture_output=True,
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


# --- several nodes -------------------------------------------------------------------------------
#
# Why network namespaces and not several ``slurmd -N <node>`` on 127.0.0.x: with ``-N`` every
# "node" is the same host to everything but Slurm: one hostname, one /etc/hosts, one set of
# addresses. A rank on node 2 would resolve node 1's name to 127.0.0.1 (itself), a master address
# that only works on the first node would still work, and a node-local folder would be shared. In
# its own network, UTS and mount namespace each slurmd (and every job step it starts) has its own
# hostname, its own address on a bridge that exists only for this test, its own /etc/hosts (the
# cluster's names only) and its own node-local folder, so Slurm and torch.distributed see distinct
# hosts. What the nodes share is the file system (as an NFS home would be) and the munge socket.

# More CPUs than this machine has (SlurmdParameters=config_overrides): the 4 ranks of a one-node
# reference run fit on one node.
NODE_CPUS = 4
NODE_MEM_MB = 6000


@dataclass
class MultiNodeCluster(Cluster):
    """A running cluster of several nodes (``nodes``: their names, node 1 first); ``local`` is
    each node's own folder at the same path (a node-local scratch disk)."""

    nodes: tuple[str, ...] = ()
    local: Path = Path()
    netns: dict[str, str] = field(default_factory=dict)

    def node_pids(self, node: str) -> list[int]:
        """Processes running in ``node``'s namespace (its slurmd, job steps and ranks)."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.netns[node]], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _free_subnet() -> str:
    """A /24 under 10.231 that no interface of this machine uses (``10.231.N``)."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    for n in range(os.getpid() % 200 + 20, 255):
        if f"10.231.{n}." not in used:
            return f"10.231.{n}"
    raise RuntimeError("no free 10.231.N.0/24 subnet")


def _multi_node_config(root: Path, subnet: str, nodes: list[str]) -> Path:
    """slurm.conf for slurmctld on this host (at ``<subnet>.1``) and ``nodes`` at ``.2``, ..."""
    lines = [
        f"NodeName={name} NodeHostname={name} NodeAddr={subnet}.{i + 2} CPUs={NODE_CPUS} "
        f"RealMemory={NODE_MEM_MB} State=UNKNOWN\n"
        for i, name in enumerate(nodes)
    ]
    conf = root / "slurm.conf"
    conf.write_text(
        _config_text(root, "finetune-multi", f"{subnet}.1", per_node=True)
        + "SrunPortRange=42000-42999\nSlurmdTimeout=30\nSlurmdParameters=config_overrides\n"
        + "".join(lines)
        + "PartitionName=multi Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO\n"
    )
    return conf


def _check_can_namespace() -> None:
    if os.geteuid() != 0:
        pytest.skip("the multi-node Slurm cluster needs root (network namespaces)")
    for tool in ("ip", "nsenter", "unshare", "mount", "hostname"):
        if not shutil.which(tool):
            pytest.skip(f"the multi-node Slurm cluster needs `{tool}`")


class _Namespaces:
    """The bridge, veth pairs and network namespaces of one cluster; :meth:`remove` deletes
    exactly these."""

    def __init__(self, tag: str, subnet: str) -> None:
        self.tag, self.subnet = tag, subnet
        self.bridge = f"{tag}br"
        self.netns: dict[str, str] = {}
        self.links: list[str] = []

    def add_bridge(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_node(self, name: str, index: int) -> str:
        """A namespace for node ``name`` at ``<subnet>.<index + 2>``; returns its name."""
        ns, host_end, node_end = f"{self.tag}n{index}", f"{self.tag}h{index}", f"{self.tag}p{index}"
        _ip("netns", "add", ns)
        self.netns[name] = ns
        _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
        self.links.append(host_end)
        _ip("link", "set", node_end, "netns", ns)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("link", "set", host_end, "up")
        for args in (
            ("addr", "add", f"{self.subnet}.{index + 2}/24", "dev", node_end),
            ("link", "set", node_end, "up"),
            ("link", "set", "lo", "up"),
        ):
            _ip("netns", "exec", ns, "ip", *args)
        return ns

    def remove(self) -> None:
        for ns in self.netns.values():
            for pid in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.5)
        for ns in self.netns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in reversed(self.links):  # a veth's peer goes with it
            subprocess.run(["ip", "link", "del", link], capture_output=True)


def _start_node(cluster: MultiNodeCluster, ns: str, name: str, hosts: Path, logs, env):
    """slurmd of node ``name`` in namespace ``ns``, with its own hostname, /etc/hosts and
    node-local folder (``cluster.local``)."""
    own = cluster.root / "nodes" / name
    own.mkdir(parents=True)
    (cluster.root / "spool" / name).mkdir()
    script = (
        f"hostname {name} && mount --bind {hosts} /etc/hosts && "
        f"mount --bind {own} {cluster.local} && exec slurmd -D -f {cluster.conf}"
    )
    return subprocess.Popen(
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding /sys/fs/cgroup from slurmd.
        ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "sh", "-c", script],
        stdout=logs,
        stderr=subprocess.STDOUT,
        env=env,
    )


@pytest.fixture(scope="session")
def multi_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNodeCluster]:
    """Three nodes ``node1`` .. ``node3``, each slurmd in its own namespaces, one
    slurmctld on this host; partition ``multi``."""
    _check_can_namespace()
    _install()
    root = tmp_path_factory.mktemp("slurm_multi")
    for sub in ("munge", "state", "spool", "log", "nodes", "local"):
        (root / sub).mkdir()
    tag = f"ft{os.getpid() % 100000}"
    subnet = _free_subnet()
    names = [f"node{i}" for i in (1, 2, 3)]
    conf = _multi_node_config(root, subnet, names)
    hosts = root / "hosts"
    hosts.write_text(
        f"127.0.0.1 localhost\n{subnet}.1 {socket.gethostname()}\n"
        + "".join(f"{subnet}.{i + 2} {name}\n" for i, name in enumerate(names))
    )
    cluster = MultiNodeCluster(
        root=root, conf=conf, partition="multi", nodes=tuple(names), local=root / "local"
    )
    spaces = _Namespaces(tag, subnet)
    cluster.netns = spaces.netns
    env = cluster.env()
    logs = open(root / "log" / "daemons.out", "w")
    daemons: list[subprocess.Popen] = []
    try:
        try:
            spaces.add_bridge()
            namespaces = [spaces.add_node(name, i) for i, name in enumerate(names)]
        except RuntimeError as err:
            pytest.skip(f"cannot make network namespaces here: {err}")
        daemons.append(_start_munge(root, logs, env))
        daemons.append(_start_slurmctld(conf, logs, env))
        for ns, name in zip(namespaces, names):
            daemons.append(_start_node(cluster, ns, name, hosts, logs, env))
        _wait_idle(cluster, len(names))
        yield cluster
    finally:
        _stop_all(cluster, daemons)
        spaces.remove()
        logs.close()
