"""Launch modes: mpiexec (through mpi4py) forms one process group and gives the same model as one process."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.distributed import gpu_index
from core.errors import UserError
from testing.conftest import REPO, load_ckpt, run_trainer

ARGS = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic"]


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    assert found, "mpiexec not found: pip install -e '.[test]' installs the mpich runtime"
    return found


# Each rank writes (to its own file: the ranks' stdout interleaves) what init_distributed derived
# from MPI, then the sum of all ranks over gloo.
PROBE = """
import os, pathlib, torch, torch.distributed as dist
from core.distributed import init_distributed
ctx = init_distributed("gloo", "cpu", 60)
total = torch.tensor([float(ctx.rank)]); dist.all_reduce(total)
fields = [ctx.rank, ctx.world_size, os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"],
          int(total.item()), os.environ["LOCAL_WORLD_SIZE"]]
pathlib.Path(os.environ["PROBE_DIR"], f"{ctx.rank}.txt").write_text(" ".join(map(str, fields)))
dist.destroy_process_group()
"""


def _run_mpiexec(args: list[str], n: int = 3, **env_vars) -> subprocess.CompletedProcess:
    # faulthandler: a rank that aborts in C++ still prints its Python stack (which phase it was in)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONFAULTHANDLER="1", **env_vars)
    proc = subprocess.Popen([_mpiexec(), "-n", str(n), sys.executable, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a hung rank: SIGINT makes mpiexec stop every rank (they run in
        proc.send_signal(signal.SIGINT)  # sessions of their own, out of reach of a kill of mpiexec alone)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=15)
        pytest.fail(f"mpiexec -n {n} did not finish in 300 s; its ranks' output:\n{err[-3000:]}\n{out[-1000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_mpiexec_sets_rank_world_and_master_from_mpi(tmp_path):
    proc = _run_mpiexec(["-c", PROBE], PROBE_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = sorted(path.read_text().split() for path in tmp_path.glob("*.txt"))
    assert [r[:3] for r in rows] == [["0", "3", "0"], ["1", "3", "1"], ["2", "3", "2"]]
    assert len({(r[3], r[4]) for r in rows}) == 1, "every rank must meet at rank 0's address and port"
    assert all(r[5] == "3" for r in rows), "0 + 1 + 2 summed over the gloo group"
    assert all(r[6] == "3" for r in rows), "three processes on this node"


def test_mpiexec_three_ranks_match_one_process(tmp_path):
    proc = _run_mpiexec(["e2e_trainer.py", *ARGS, "-backend", "gloo", "-outputPath", str(tmp_path), "-run_name", "mpi"])
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-1000:]
    assert proc.stdout.count("Final results of mpi") == 1, "only rank 0 of one 3-rank group reports"
    single = run_trainer([*ARGS, "-outputPath", str(tmp_path), "-run_name", "single"])
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_ckpt(tmp_path / "mpi"), load_ckpt(tmp_path / "single")
    assert torch.allclose(a["global"], b["global"], atol=1e-5, rtol=0)
    assert a["client_store"]["entries"].keys() == b["client_store"]["entries"].keys()


def test_gpu_of_each_process():
    """LOCAL_RANK picks the GPU; gloo lets processes share one; nccl needs one GPU per process."""
    assert [gpu_index(r, 4, 4, "nccl") for r in range(4)] == [0, 1, 2, 3]
    assert [gpu_index(r, 4, 1, "gloo") for r in range(4)] == [0, 0, 0, 0]
    assert [gpu_index(r, 4, 2, "gloo") for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(UserError, match="4 processes share 1 GPU.*-backend gloo"):
        gpu_index(0, 4, 1, "nccl")
