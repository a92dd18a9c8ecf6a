"""A dying worker stops the run with its rank named; task folders plug in without touching core."""
from __future__ import annotations

import subprocess
import sys

import pytest

from testing.conftest import REPO, rank_envs, read_metrics, run_trainer

DYING = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml",
         "-task", str(REPO / "testing" / "tasks" / "dying_task"), "--set", "model_config.model_type=DyingMLP"]


@pytest.mark.timeout(300)
def test_dead_worker_stops_the_server_with_its_rank(tmp_path):
    """Three processes started by hand (as mpiexec would): rank 2 dies, the server names it."""
    procs = [subprocess.Popen([sys.executable, "e2e_trainer.py", *DYING, "-outputPath", str(tmp_path),
                               "-run_name", "dying"], cwd=REPO, stderr=subprocess.PIPE, text=True, env=env)
             for env in rank_envs(3)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1, 3]
    server_line = errs[0].strip().splitlines()[-1]
    assert server_line.startswith("pfedsim: error: round 1 reduce failed on the server: rank 2 stopped at")


@pytest.mark.timeout(300)
def test_server_start_error_releases_the_workers(tmp_path):
    """A mistake only the server sees (a missing -resume checkpoint) stops every rank at once,
    not after the process-group timeout (200 s here, longer than the 150 s allowed)."""
    args = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic",
            "-outputPath", str(tmp_path), "-run_name", "r", "-resume", str(tmp_path / "missing.pt"),
            "--set", "server_config.timeout_s=200"]
    procs = [subprocess.Popen([sys.executable, "e2e_trainer.py", *args], cwd=REPO, stderr=subprocess.PIPE,
                              text=True, env=env) for env in rank_envs(2)]
    errs = [p.communicate(timeout=150)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 0], errs
    assert errs[0].strip().splitlines()[-1].startswith(f"pfedsim: error: checkpoint {tmp_path / 'missing.pt'} not found")


@pytest.mark.timeout(300)
def test_dead_worker_under_torchrun_names_the_rank(tmp_path):
    proc = run_trainer([*DYING, "-outputPath", str(tmp_path), "-run_name", "dying"], nproc=3, timeout=240)
    assert proc.returncode != 0
    assert "rank 2 stopped" in proc.stderr and proc.stderr.strip().endswith("exited with status 3"), proc.stderr[-3000:]


def test_second_task_folder_runs_and_personalizes(tmp_path):
    """experiments/synthetic is a task folder added without any change to core."""
    proc = run_trainer(["-dataPath", "unused", "-outputPath", str(tmp_path), "-config", "experiments/synthetic/config.yaml",
                        "-task", "synthetic", "-run_name", "syn"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = read_metrics(tmp_path / "syn")[-1]
    assert last["round"] == 10
    assert last["personalized"]["weighted_mean"] > last["global_local"]["weighted_mean"] > 0.1
