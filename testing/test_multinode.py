"""Multi-node launch: two torchrun "nodes" on loopback give the same global model as one process."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from testing.conftest import REPO, failure_text, free_port, load_ckpt, read_metrics, run_trainer

ARGS = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic"]


def _node(node_rank: int, port: int, args: list[str]) -> subprocess.Popen:
    """One node's launcher: torchrun with 2 nodes x 1 process, static rendezvous at 127.0.0.1:port."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
                "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return subprocess.Popen(launcher + ["e2e_trainer.py"] + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_nodes_match_one_process(tmp_path):
    port = free_port()
    args = [*ARGS, "-outputPath", str(tmp_path), "-run_name", "two_nodes"]
    nodes = [_node(rank, port, args) for rank in (0, 1)]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    for rank, proc in enumerate(results):
        assert proc.returncode == 0, f"node {rank}:\n" + failure_text(proc)
    assert "Final results of two_nodes" in results[0].stdout
    assert "Final results" not in results[1].stdout, "node 1 hosts a worker only; the server is global rank 0"
    single = run_trainer([*ARGS, "-outputPath", str(tmp_path), "-run_name", "single"])
    assert single.returncode == 0, failure_text(single)
    a, b = load_ckpt(tmp_path / "two_nodes"), load_ckpt(tmp_path / "single")
    assert a["round"] == b["round"] == 10
    assert torch.allclose(a["global"], b["global"], atol=1e-5, rtol=0)
    assert a["client_store"]["entries"].keys() == b["client_store"]["entries"].keys()
    assert [r["round"] for r in read_metrics(tmp_path / "two_nodes")] == [5, 10]
