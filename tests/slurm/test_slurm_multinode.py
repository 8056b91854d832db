"""Jobs across several nodes of a real Slurm cluster (``multi_node_cluster``: one slurmd per node,
each in its own network, UTS and mount namespace; see tests/slurm/conftest.py).

1. Where the ranks run: every rank of a 2-node x 2-task job reports the node whose slurmd started
   it (``SLURMD_NODENAME``, its hostname), ``SLURM_NODEID``, its global and local rank, and joins
   one gloo process group at the allocation's first node; a 3-node step runs once on each node.
2. summarization ``tiny`` with DDP on 2 nodes x 1 task ends with the weights of the same job on
   one node x 2 tasks (tolerance 1e-5), and its manifest names the nodes it ran on.
3. lora_llm ``tiny`` (bfloat16 base, LoRA) with FSDP2 ``HYBRID_SHARD`` on 2 nodes x 2 tasks: the
   shard groups are the ranks of one node (replicas across nodes), and the adapter equals that of
   the same mesh on one node x 4 tasks.
4. A lost node never hangs: the ranks of node 2 are killed mid-epoch; node 1's rank leaves within
   ``trainer.dist_timeout`` plus a minute with one message naming the step and the gone peer, and
   the job ends FAILED (the job submitted again resumes from the last complete checkpoint: item
   7, after a hung node, checks it). Its venv is on node-local storage (``LOCAL_SCRATCH``):
   synced once per node, and each rank runs from its own node's copy.
5. Preemption across nodes: USR1 to every rank of a 2-node job (what ``--signal=USR1@N`` does
   before the time limit) -> one checkpoint -> requeue -> resume, ending bit-identical to the
   uninterrupted 2-node job.
   With FSDP2 (qwen_vl, next item): every rank's shard file is written once, holds that rank's
   slice, and is read back by the same two ranks.
6. qwen_vl ``tiny`` with FSDP2 and the users' recipe settings (7B preset's ``fsdp`` group) on 2
   nodes x 1 task ends with the weights of 1 node x 2 tasks.
7. A hung node never hangs the job: node 2's ranks are frozen (SIGSTOP) mid-epoch; node 1's
   ranks leave within ``trainer.dist_timeout`` plus a minute with a message naming the step and
   the peer that did not answer, the job ends FAILED, and the job submitted again resumes from the
   last complete checkpoint and ends with the weights of the same job on 1 node x 4 tasks
   (summarization DDP on 2 nodes x 2 tasks).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

# Each rank: where it runs and who it is as Slurm tells it, then one all_gather over gloo between
# the nodes at the first node's name (resolved on every node by its own /etc/hosts). torch only:
# Lightning's reading of the same variables is what the training jobs below exercise.
RANK_REPORT = """
import datetime, json, os, socket
import torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group(
    "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60),
)
me = {
    "slurmd_nodename": os.environ["SLURMD_NODENAME"], "hostname": socket.gethostname(),
    "node_id": int(os.environ["SLURM_NODEID"]), "global_rank": rank,
    "local_rank": int(os.environ["SLURM_LOCALID"]), "master_addr": os.environ["MASTER_ADDR"],
}
seen = [None] * world
dist.all_gather_object(seen, me["hostname"])
me["group_hosts"] = seen
dist.destroy_process_group()
print("RANK " + json.dumps(me), flush=True)
"""


def sbatch(cluster, workdir: Path, script: str, *options: str) -> str:
    """Submit a batch script (its text) to the multi-node cluster; returns the job id."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "job.sh"
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + script)
    done = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--chdir={workdir}",
            f"--output={workdir}/job_%j.out",
            f"--partition={cluster.partition}",
            "--cpus-per-task=1",
            "--mem=2G",
            "--time=10",
            *options,
            str(path),
        ],
        capture_output=True,
        text=True,
        env=cluster.env(OMP_NUM_THREADS="1"),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def submit_task(
    cluster, workdir: Path, task: str, nodes: int, per_node: int, *args: str, **job_env: str
) -> str:
    """Submit ``packages/<task>/slurm/train.sbatch`` in CPU mode on ``nodes`` x ``per_node``
    tasks of the ``tiny`` preset, deterministic (``job_env``: more environment); returns the job
    id."""
    options = [f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--mem=3G", "--time=20"]
    return cluster.submit_task(
        workdir, task, options, ["trainer.deterministic=true", *args], **job_env
    )


def assert_ran_on(cluster, run: Path, info: dict[str, str], per_node: int) -> None:
    """The manifest of the run's last start names the nodes of the job's last start (``info``)
    and ``per_node`` ranks on each. A resume keeps ``manifest.json`` and, when it ran on other
    nodes, writes a timestamped copy: the newest copy is the last start's."""
    copies = sorted(run.glob("manifest.*.json"))
    manifest = json.loads((copies[-1] if copies else run / "manifest.json").read_text())
    allocated = cluster.run("scontrol", "show", "hostnames", info["NodeList"]).split()
    assert len(allocated) == manifest["nodes"] and set(allocated) <= set(cluster.nodes)
    assert manifest["world_size"] == len(allocated) * per_node
    assert manifest["ranks_per_node"] == per_node and manifest["node_names"] == allocated


def finished_run(cluster, workdir: Path, task: str, job: str) -> tuple[Path, dict[str, str]]:
    """Wait for the job; assert it completed; returns its run folder and its last job record."""
    info = cluster.wait(job, timeout=900)
    log = (workdir / "logs" / f"{task}_{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    runs = [p for p in (workdir / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0], info


def assert_same_weights(
    a_run: Path, b_run: Path, tol: float = 1e-5, name: str = "model.safetensors"
) -> None:
    from safetensors.torch import load_file

    a = load_file(a_run / "final" / name)
    b = load_file(b_run / "final" / name)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, f"final weights differ by up to {worst:g}"


def test_ranks_run_on_their_nodes_and_meet_at_the_first_node(multi_node_cluster, tmp_path):
    cluster = multi_node_cluster
    (tmp_path / "report.py").write_text(RANK_REPORT)
    job = sbatch(
        cluster,
        tmp_path,
        "srun --nodes=3 --ntasks=3 --ntasks-per-node=1 hostname\n"
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
        "export MASTER_PORT=29533\n"
        f"srun --nodes=2 --ntasks=4 --ntasks-per-node=2 {sys.executable} {tmp_path}/report.py\n",
        "--nodes=3",
        "--ntasks-per-node=2",
    )
    info = cluster.wait(job, timeout=300)
    out = (tmp_path / f"job_{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out[-3000:]
    lines = out.splitlines()
    assert sorted(line for line in lines if line.startswith("node")) == list(cluster.nodes)
    ranks = sorted(
        (json.loads(line[5:]) for line in lines if line.startswith("RANK ")),
        key=lambda r: r["global_rank"],
    )
    first, second = cluster.nodes[:2]
    assert [r["global_rank"] for r in ranks] == [0, 1, 2, 3], out[-3000:]
    for r in ranks:
        node = r["global_rank"] // 2
        assert r["slurmd_nodename"] == r["hostname"] == (first, second)[node]
        assert r["node_id"] == node
        assert r["local_rank"] == r["global_rank"] % 2
        assert r["master_addr"] == first
        assert r["group_hosts"] == [first, first, second, second]


def shard_groups(run: Path) -> list[list[int]]:
    """The ``HYBRID_SHARD`` shard groups that rank 0 logged (core.parallel.fsdp)."""
    marker = "HYBRID_SHARD shard groups (global ranks): "
    lines = [line for line in (run / "train.log").read_text().splitlines() if marker in line]
    assert lines, "no shard groups in train.log"
    return json.loads(lines[0].split(marker, 1)[1])


def test_lora_llm_hybrid_shard_follows_the_node_boundary(multi_node_cluster, tmp_path):
    cluster = multi_node_cluster
    args = (
        "quant.bits=null",
        "model.dtype=bfloat16",
        "optim.name=adamw",  # paged_adamw_8bit cannot step DTensor shards
        "trainer.strategy=fsdp",
        "fsdp.sharding_strategy=HYBRID_SHARD",
        "trainer.max_steps=3",
        "trainer.max_epochs=null",
        "trainer.batch_size=2",
        "data.max_samples=32",
        "trainer.val_every_n_steps=1000",
        "logger.plot=false",
    )
    # fsdp.shard_size stays null on two nodes: a shard group is the tasks of one node.
    two = submit_task(cluster, tmp_path / "two", "lora_llm", 2, 2, *args)
    one = submit_task(cluster, tmp_path / "one", "lora_llm", 1, 4, *args, "fsdp.shard_size=2")
    two_run, info = finished_run(cluster, tmp_path / "two", "lora_llm", two)
    one_run, one_info = finished_run(cluster, tmp_path / "one", "lora_llm", one)
    assert_ran_on(cluster, two_run, info, 2)
    assert_ran_on(cluster, one_run, one_info, 4)
    assert json.loads((two_run / "manifest.json").read_text())["strategy"] == "FSDP2Strategy"
    # Slurm places ranks 0, 1 on the first node and 2, 3 on the second (checked above).
    assert shard_groups(two_run) == [[0, 1], [2, 3]] == shard_groups(one_run)
    assert_same_weights(two_run, one_run, name="adapter_model.safetensors")


def wait_for_step(cluster, job: str, runs: Path, step: int, timeout: float = 600) -> Path:
    """Wait until the job's run has logged ``step`` (metrics.jsonl); returns the run folder."""
    deadline = time.time() + timeout
    while True:
        found = list(runs.glob("*/metrics.jsonl")) if runs.is_dir() else []
        if found and f'"step": {step},' in found[0].read_text():
            return found[0].parent
        assert time.time() < deadline, f"job {job} did not reach step {step}"
        state = cluster.job_state(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), cluster.job_state(job)
        time.sleep(0.2)


def train_pids(cluster, node: str) -> list[int]:
    """The training ranks running on ``node``."""
    pids = []
    for pid in cluster.node_pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"/bin/train") for part in cmdline):
            pids.append(pid)
    return pids


def assert_ranks_use_their_nodes_venv(cluster, nodes: list[str], venv: str) -> None:
    """Every rank on each of ``nodes`` runs from the venv in that node's own local folder (the
    same path on every node, a different folder behind it: ``/proc/<pid>/root`` is the rank's
    view of the file system), and only those nodes have one."""
    for node in nodes:
        own = (cluster.root / "nodes" / node / venv / "pyvenv.cfg").stat()
        pids = train_pids(cluster, node)
        assert pids, f"no rank on {node}"
        for pid in pids:
            seen = Path(f"/proc/{pid}/root{cluster.local}/{venv}/pyvenv.cfg").stat()
            assert (seen.st_dev, seen.st_ino) == (own.st_dev, own.st_ino), (node, pid)
    synced = [n for n in cluster.nodes if (cluster.root / "nodes" / n / venv).is_dir()]
    assert synced == sorted(nodes)


# The jobs that lose a node: 12 steps of summarization ``tiny``, a checkpoint every 2, and a
# collective timeout of FAULT_TIMEOUT seconds.
FAULT_TIMEOUT = 20
FAULT_ARGS = (
    "trainer.max_steps=12",
    "trainer.log_every_n_steps=1",
    "trainer.ckpt_every_n_steps=2",
    "trainer.val_every_n_steps=1000",
    "data.max_val_samples=8",
    "generation.max_new_tokens=8",
    f"trainer.dist_timeout={FAULT_TIMEOUT}",
)


def test_a_lost_node_fails_the_job_quickly(multi_node_cluster, tmp_path):
    cluster, timeout, args = multi_node_cluster, FAULT_TIMEOUT, FAULT_ARGS
    # The venv on node-local storage, synced once per node from the machine's uv cache (the
    # same path on every node: the cluster's node-local folder).
    local = {
        "LOCAL_SCRATCH": str(cluster.local),
        "UV_CACHE_DIR": subprocess.run(
            ["uv", "cache", "dir"], capture_output=True, text=True, check=True
        ).stdout.strip(),
        "UV_LINK_MODE": "symlink",
        "UV_OFFLINE": "1",
    }
    job = submit_task(cluster, tmp_path, "summarization", 2, 1, *args, **local)
    run = wait_for_step(cluster, job, tmp_path / "runs", 3)
    nodes = cluster.run("scontrol", "show", "hostnames", cluster.job_state(job)["NodeList"])
    assert_ranks_use_their_nodes_venv(cluster, nodes.split(), "venv-summarization")
    killed_at = time.time()
    for pid in train_pids(cluster, nodes.split()[1]):
        os.kill(pid, signal.SIGKILL)
    info = cluster.wait(job, timeout=timeout + 60)
    left_after = time.time() - killed_at
    log = (tmp_path / "logs" / f"summarization_{job}.out").read_text()
    assert info["JobState"] == "FAILED", log[-3000:]
    assert len(re.findall(r"^Installed \d+ packages", log, re.M)) == 2, "one sync per node"
    assert left_after < timeout + 60
    stopped = re.search(r"Rank 0 stopped at step (\d+) of 12: rank 1 is gone", log)
    assert stopped and int(stopped.group(1)) >= 3, log[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    # The job submitted again resumes from the last complete checkpoint: checked after the
    # hung node below (the same failed run -> the same command with run.dir=), which needs that
    # job anyway (CI time).
    print(f"node 1's rank left {left_after:.0f} s after the kill")


def test_a_hung_node_fails_the_job_in_time_and_4_ranks_on_2_nodes_equal_1_node(
    multi_node_cluster, tmp_path
):
    """Step 7 of the module docstring: node 2's two ranks are stopped (SIGSTOP: alive, their
    connections open, silent, as a frozen node or a network partition looks), so node 1's ranks
    can only find out by ``trainer.dist_timeout``. The run resumed after it is also the 2 nodes x
    2 tasks DDP job compared with 1 node x 4 tasks (the resume is exact; CI time)."""
    cluster, timeout, args = multi_node_cluster, FAULT_TIMEOUT, FAULT_ARGS
    one = submit_task(cluster, tmp_path / "one", "summarization", 1, 4, *args)
    job = submit_task(cluster, tmp_path, "summarization", 2, 2, *args)
    run = wait_for_step(cluster, job, tmp_path / "runs", 3)
    node2 = cluster.run("scontrol", "show", "hostnames", cluster.job_state(job)["NodeList"])
    frozen = train_pids(cluster, node2.split()[1])
    assert len(frozen) >= 2, frozen  # its two ranks (and any data-loading workers)
    stopped_at = time.time()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    info = cluster.wait(job, timeout=timeout + 60)
    left_after = time.time() - stopped_at
    log = (tmp_path / "logs" / f"summarization_{job}.out").read_text()
    assert info["JobState"] == "FAILED", log[-3000:]
    assert left_after < timeout + 60
    stopped = re.search(
        r"Rank 0 stopped at step (\d+) of 12: another rank did not answer within "
        rf"trainer.dist_timeout={timeout} s",
        log,
    )
    assert stopped and int(stopped.group(1)) >= 3, log[-3000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    last = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))

    again = submit_task(cluster, tmp_path, "summarization", 2, 2, *args, f"run.dir={run}")
    info = cluster.wait(again, timeout=900)
    log = (tmp_path / "logs" / f"summarization_{again}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert f"Resumed from {run / 'checkpoints' / f'step-{last:07d}'}: step {last}," in log
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in metrics) == 12
    one_run, one_info = finished_run(cluster, tmp_path / "one", "summarization", one)
    assert_ran_on(cluster, run, info, 2)
    assert_ran_on(cluster, one_run, one_info, 4)
    assert_same_weights(run, one_run)
    print(f"node 1's ranks left {left_after:.0f} s after node 2 froze; resumed from step {last}")


def test_summarization_on_two_nodes_equals_one_node_and_resumes_after_usr1_bit_identical(
    multi_node_cluster, tmp_path
):
    """Steps 2 and 5 of the module docstring share the uninterrupted 2-node job (CI time)."""
    from safetensors.torch import load_file

    cluster = multi_node_cluster
    args = (
        "trainer.max_steps=10",
        "trainer.log_every_n_steps=1",
        "trainer.val_every_n_steps=1000",
        "data.max_val_samples=8",
        "generation.max_new_tokens=8",
    )
    full = submit_task(cluster, tmp_path / "full", "summarization", 2, 1, *args)
    cut = submit_task(cluster, tmp_path / "cut", "summarization", 2, 1, *args)
    one = submit_task(cluster, tmp_path / "one", "summarization", 1, 2, *args)
    wait_for_step(cluster, cut, tmp_path / "cut" / "runs", 3)
    cluster.run("scancel", "--signal=USR1", cut)  # every rank of the job's steps, on both nodes
    full_run, info = finished_run(cluster, tmp_path / "full", "summarization", full)
    one_run, one_info = finished_run(cluster, tmp_path / "one", "summarization", one)
    cut_run, cut_info = finished_run(cluster, tmp_path / "cut", "summarization", cut)
    assert_ran_on(cluster, full_run, info, 1)
    assert_ran_on(cluster, one_run, one_info, 2)
    assert_ran_on(cluster, cut_run, cut_info, 1)
    assert_same_weights(full_run, one_run)

    log = (tmp_path / "cut" / "logs" / f"summarization_{cut}.out").read_text()
    assert int(cut_info.get("Restarts", "0")) == 1, f"the job was not requeued once: {cut_info}"
    assert "Received SIGUSR1" in log and "Requeued SLURM job" in log and "Resumed from" in log
    metrics = [json.loads(line) for line in (cut_run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in metrics) == 10
    a = load_file(full_run / "final" / "model.safetensors")
    b = load_file(cut_run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), (
        "resumed weights differ from the uninterrupted 2-node job"
    )


def assert_shards_written_once_by_their_ranks(run: Path, restarted: str) -> None:
    """The one USR1 checkpoint of a 2-rank FSDP2 run: one shard file per rank, ``__<r>_0.distcp``
    holding rank ``r``'s dim-0 slice of every sharded tensor (as ``.metadata`` records it), and
    no file of it written after the job's last start (``restarted``: Slurm's StartTime)."""
    import datetime

    from torch.distributed.checkpoint import FileSystemReader

    cut = min((run / "checkpoints").glob("step-*"))
    files = sorted((cut / "state").glob("*.distcp"))
    assert [p.name for p in files] == ["__0_0.distcp", "__1_0.distcp"]
    chunks: dict[str, list[tuple[int, str]]] = {}
    for index, where in FileSystemReader(str(cut / "state")).read_metadata().storage_data.items():
        if index.offset is not None and len(index.offset) > 0:
            chunks.setdefault(index.fqn, []).append((index.offset[0], where.relative_path))
    sharded = {fqn: sorted(c) for fqn, c in chunks.items() if len(c) == 2}
    assert sharded, "no tensor sharded over the two ranks in the checkpoint"
    for fqn, ((_, first), (_, second)) in sharded.items():
        assert (first, second) == ("__0_0.distcp", "__1_0.distcp"), fqn
    started = datetime.datetime.fromisoformat(restarted).timestamp()
    for path in [*files, cut / "state" / ".metadata"]:
        assert path.stat().st_mtime < started, f"{path} was written again after the requeue"


def test_qwen_vl_fsdp2_on_two_nodes_equals_one_node_and_resumes_after_usr1(
    multi_node_cluster, tmp_path
):
    """Step 6 of the module docstring, and step 5 with FSDP2 (sharded checkpoints): the
    uninterrupted 2-node job is the reference of both. It replaces the single-node FSDP2 USR1 test
    (a strict subset: 2 ranks, USR1, requeue, resume, same weights, one shard file per rank)."""
    cluster = multi_node_cluster
    args = (
        "trainer.strategy=fsdp",
        "fsdp.sharding_strategy=FULL_SHARD",
        "fsdp.activation_checkpointing=true",
        "fsdp.prefetch_backward=1",
        "fsdp.sync_module_states=true",
        "trainer.max_steps=16",
        "trainer.log_every_n_steps=1",
        "trainer.val_every_n_steps=1000",
        "trainer.ckpt_every_n_steps=1000",
        "checkpoint.load_best_at_end=false",
        "checkpoint.keep_last=2",  # the USR1 checkpoint stays next to the final one
        "logger.plot=false",
    )
    two = submit_task(cluster, tmp_path / "two", "qwen_vl", 2, 1, *args)
    cut = submit_task(cluster, tmp_path / "cut", "qwen_vl", 2, 1, *args)
    one = submit_task(cluster, tmp_path / "one", "qwen_vl", 1, 2, *args)
    wait_for_step(cluster, cut, tmp_path / "cut" / "runs", 2)
    cluster.run("scancel", "--signal=USR1", cut)  # every rank of the job's steps, on both nodes
    two_run, info = finished_run(cluster, tmp_path / "two", "qwen_vl", two)
    one_run, _ = finished_run(cluster, tmp_path / "one", "qwen_vl", one)
    cut_run, cut_info = finished_run(cluster, tmp_path / "cut", "qwen_vl", cut)
    assert_ran_on(cluster, two_run, info, 1)
    assert_ran_on(cluster, cut_run, cut_info, 1)
    for run in (two_run, cut_run):
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["strategy"] == "FSDP2Strategy"
    assert_same_weights(two_run, one_run)

    log = (tmp_path / "cut" / "logs" / f"qwen_vl_{cut}.out").read_text()
    assert int(cut_info.get("Restarts", "0")) == 1, f"the job was not requeued once: {cut_info}"
    assert "Received SIGUSR1" in log and "Requeued SLURM job" in log and "Resumed from" in log
    # Both starts of the job numbered the same two ranks (Lightning's line per rank and start).
    for rank in (0, 1):
        assert log.count(f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2") == 2, log[-3000:]
    assert json.loads((cut_run / "summary.json").read_text())["status"] == "completed"
    metrics = [json.loads(line) for line in (cut_run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in metrics) == 16
    assert_shards_written_once_by_their_ranks(cut_run, cut_info["StartTime"])
    assert_same_weights(two_run, cut_run, tol=0.0)
