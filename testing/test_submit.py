"""submit.py through submitit's local executor: ranks from the job environment, and requeue resumes."""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from testing.conftest import REPO, load_ckpt, read_metrics, run_trainer

submitit = pytest.importorskip("submitit", reason="pip install -e '.[test]' installs submitit")
import submit  # noqa: E402  (after the skip: submit.py needs submitit to run jobs)

ARGS = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic"]
LONG = ["--set", "server_config.max_iteration=300", "--set", "server_config.ckpt_freq=5",
        "--set", "server_config.val_freq=5"]


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    """Tasks inherit this environment: one thread each, no progress bars, run from the repo root."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(REPO)


def _submit(out: Path, name: str, *extra: str):
    job, _ = submit.submit(["--executor", "local", "--time", "10", *ARGS, "-outputPath", str(out),
                            "-run_name", name, *extra])
    return job


def _task_pids(job) -> list[int]:
    """The task processes started by the local controller (its children)."""
    pid = job._process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def test_two_tasks_take_rank_and_world_from_the_job(tmp_path):
    job = _submit(tmp_path, "two_tasks", "--tasks_per_node", "2")
    assert job.results() == [str(tmp_path / "two_tasks")] * 2, job.stderr()
    logs = [job.task(k).stdout() or "" for k in (0, 1)]
    assert "Final results of two_tasks" in logs[0] and "Final results" not in logs[1], \
        "task 0 must be the server of one 2-rank group"
    single = run_trainer([*ARGS, "-outputPath", str(tmp_path), "-run_name", "single"])
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_ckpt(tmp_path / "two_tasks"), load_ckpt(tmp_path / "single")
    assert torch.allclose(a["global"], b["global"], atol=1e-5, rtol=0)


def test_preempted_job_is_requeued_and_resumes_from_latest(tmp_path):
    run = tmp_path / "requeued"
    job = _submit(tmp_path, "requeued", "--tasks_per_node", "2", *LONG)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "latest.pt").exists():
        assert job.state == "RUNNING" and time.time() < deadline, job.stderr()
        time.sleep(0.05)
    pids = _task_pids(job)
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)  # what SLURM sends every task before preemption / the time limit
    assert job.results() == [str(run)] * 2, job.stderr()
    log = job.stdout()
    assert "attempt 0: starting from round 1" in log
    assert f"attempt 1: resuming from {run / 'checkpoints' / 'latest.pt'}" in log, log[-3000:]
    assert [r["round"] for r in read_metrics(run)] == list(range(5, 301, 5)), "rounds continue, none repeated"
    straight = run_trainer([*ARGS, *LONG, "-outputPath", str(tmp_path), "-run_name", "straight"], nproc=2)
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed, full = load_ckpt(run), load_ckpt(tmp_path / "straight")
    assert resumed["round"] == full["round"] == 300
    gap = float((resumed["global"] - full["global"]).abs().max())  # failed once under heavy load: say by how much
    assert gap <= 1e-6, f"requeued run differs from the straight run by {gap:.3g}; attempts: {log[-2000:]}"


def test_requeue_without_checkpoint_starts_over(tmp_path):
    run = tmp_path / "early"
    (run).mkdir()
    (run / "metrics.jsonl").write_text('{"round": 5}\n')  # an attempt preempted before its first checkpoint
    requeued = submit.TrainerJob(["-x"], run).checkpoint()
    assert requeued.function.attempt == 1
    assert requeued.function._resume_args(rank=0) == []
    assert not (run / "metrics.jsonl").exists()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest.pt").write_bytes(b"")
    assert requeued.function._resume_args(rank=0) == ["-resume", str(run / "checkpoints" / "latest.pt")]


def test_mistakes_fail_at_submission(tmp_path, capsys):
    assert submit.main(["--executor", "local", *ARGS, "-outputPath", str(tmp_path), "--set", "nope=1"]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err
    assert submit.main(["--nodes", "2", "--executor", "local", *ARGS, "-outputPath", str(tmp_path)]) == 2
    assert submit.main([*ARGS, "-outputPath", str(tmp_path)]) == 2
    assert "--partition is required" in capsys.readouterr().err
    err = _submit_error(capsys, ["--executor", "local", *ARGS, "-outputPath", str(tmp_path), "-sed", "1"])
    assert "trainer arguments: unrecognized arguments: -sed 1" in err
    assert "invalid choice: 'locl'" in _submit_error(capsys, ["--executor", "locl", *ARGS, "-outputPath", str(tmp_path)])
    if shutil.which("srun") is None:
        err = _submit_error(capsys, ["--partition", "gpu", *ARGS, "-outputPath", str(tmp_path)])
        assert err.startswith("pfedsim: error: --executor slurm: ") and "--executor local" in err
    assert not any(tmp_path.iterdir()), "nothing is submitted or created on a mistake"
    (tmp_path / "afile").write_text("")
    err = _submit_error(capsys, ["--executor", "local", *ARGS, "-outputPath", str(tmp_path / "afile" / "out")])
    assert "cannot create the folder" in err
    err = _submit_error(capsys, ["--executor", "local", *ARGS, "-outputPath", str(tmp_path), "--set",
                                 "model_config.options={width: 2}"])
    assert "model_config.options: MLP reads no option 'width'" in err


def _submit_error(capsys, argv) -> str:
    try:
        code = submit.main(argv)
    except SystemExit as stop:  # argparse's own mistakes
        code = stop.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("pfedsim: error: "), lines
    return lines[0]
