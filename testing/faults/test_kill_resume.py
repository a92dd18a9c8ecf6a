"""kill -9 at a random round and resume: the run ends bit-identical to an uninterrupted one, with 1
and 2 processes (DESIGN invariant 5)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
import torch

from testing.conftest import REPO, read_metrics
from utils.sweep import launcher

ROUNDS = 10
ARGS = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic",
        "--set", f"server_config.max_iteration={ROUNDS}", "--set", "server_config.ckpt_freq=1",
        "--set", "server_config.val_freq=2"]
TIMING = {"elapsed_s", "sec_per_round", "round_s"}


def _start(out, name: str, nproc: int, *extra: str) -> subprocess.Popen:
    """e2e_trainer.py in a session of its own (so that one killpg reaches the launcher and every rank)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    log = open(out / f"{name}.{'resume' if extra else 'first'}.log", "w")
    cmd = launcher(nproc) + ["e2e_trainer.py", *ARGS, "-outputPath", str(out), "-run_name", name, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _saved_round(path) -> int:
    """The round of checkpoint ``path`` (0 while there is none)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["round"]
    except FileNotFoundError:
        return 0


def _without_timing(record):
    if isinstance(record, dict):
        return {k: _without_timing(v) for k, v in record.items() if k not in TIMING}
    return record


def _finish(proc: subprocess.Popen, out, name: str, first: bool = True) -> None:
    code = proc.wait(timeout=300)
    log = (out / f"{name}.{'first' if first else 'resume'}.log").read_text()
    assert code == 0, log[-3000:]


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_at_a_random_round_then_resume_is_bit_identical(tmp_path, nproc):
    kill_at = random.Random(nproc).randint(2, ROUNDS - 3)  # the round in progress when killed
    reference = _start(tmp_path, "full", nproc)
    victim = _start(tmp_path, "killed", nproc)
    latest = tmp_path / "killed" / "checkpoints" / "latest.pt"
    deadline = time.monotonic() + 240
    while _saved_round(latest) < kill_at - 1:  # its checkpoint of the round before exists: round kill_at runs
        assert victim.poll() is None, (tmp_path / "killed.first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run did not reach its checkpoint of round {kill_at - 1}"
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    seen = _saved_round(latest)
    assert kill_at - 1 <= seen < ROUNDS, f"killed after its checkpoint of round {seen}, before the end"
    resumed = _start(tmp_path, "killed", nproc, "-resume")
    _finish(reference, tmp_path, "full")
    _finish(resumed, tmp_path, "killed", first=False)
    full = torch.load(tmp_path / "full" / "checkpoints" / "latest.pt", weights_only=False)
    again = torch.load(latest, weights_only=False)
    assert full["round"] == again["round"] == ROUNDS
    assert torch.equal(full["global"], again["global"]), \
        f"killed at round {kill_at} (checkpoint of round {seen}): max difference " \
        f"{(full['global'] - again['global']).abs().max().item()}"
    assert full["client_store"]["entries"].keys() == again["client_store"]["entries"].keys()
    assert all(torch.equal(v, again["client_store"]["entries"][c]) for c, v in full["client_store"]["entries"].items())
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "killed")
    assert [r["round"] for r in b] == list(range(2, ROUNDS + 1, 2))
    assert [_without_timing(r) for r in a] == [_without_timing(r) for r in b]
