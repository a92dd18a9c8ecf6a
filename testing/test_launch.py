"""Launch modes: mpiexec (through mpi4py) gives the same model as one process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from testing.conftest import REPO, load_ckpt, run_trainer

ARGS = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic"]


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    assert found, "mpiexec not found: pip install -e '.[test]' installs the mpich runtime"
    return found


def test_mpiexec_three_ranks_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run([_mpiexec(), "-n", "3", sys.executable, "e2e_trainer.py", *ARGS, "-outputPath", str(tmp_path),
                           "-run_name", "mpi"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    single = run_trainer([*ARGS, "-outputPath", str(tmp_path), "-run_name", "single"])
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_ckpt(tmp_path / "mpi"), load_ckpt(tmp_path / "single")
    assert torch.allclose(a["global"], b["global"], atol=1e-5, rtol=0)
    assert a["client_store"]["entries"].keys() == b["client_store"]["entries"].keys()
