"""Jobs across several nodes of a real Slurm cluster (``multi_node_cluster``: one slurmd per node,
each in its own network, UTS and mount namespace; see tests/slurm/conftest.py).

1. Where the ranks run: every rank of a 2-node x 2-task job reports the node whose slurmd started
   it (``SLURMD_NODENAME``, its hostname), ``SLURM_NODEID``, its global and local rank, and joins
   one gloo process group at the allocation's first node; a 3-node step runs once on each node.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
