"""Stops from outside: the launcher killed with SIGKILL, Ctrl-C (SIGINT to the whole process group)
and SIGTERM, under pfedsim's launch.py, under torch.distributed.run and in a plain process. Every
rank stops within seconds with at most one line (the server's says the round and the ``-resume``
that continues the run), no traceback of ours, the exit status of the signal, and
checkpoints/latest.pt intact; a resume then ends bit-identical to an uninterrupted run.

launch.py runs torch.distributed.run in its own process and exits 130 / 143 after SIGINT / SIGTERM
with nothing of its own on stderr. Plain torch.distributed.run exits with status 1 instead and
prints its own traceback (``SignalException: Process N got signal: 2``) and a warning line: its
signal handler raises that exception in the launcher's process (see
``torch/distributed/elastic/multiprocessing/api.py``, ``_terminate_process_handler``).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from testing.conftest import REPO
from utils.sweep import launcher

ARGS = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml",
        "--set", "server_config.ckpt_freq=2", "--set", "server_config.val_freq=10"]
SYNTHETIC = ["-task", "synthetic"]
DYING = ["-task", str(REPO / "testing" / "tasks" / "dying_task"), "--set", "model_config.model_type=DyingMLP"]
ENDLESS = ["--set", "server_config.max_iteration=100000"]  # runs until stopped
ROUNDS = 30  # a run that finishes (the resume test): the signal lands after round 2, long before the end
TORCHRUN_SIGNALLED = 1  # what plain torch.distributed.run returns after it was sent SIGINT or SIGTERM (see above)
STATUS = {"SIGINT": 130, "SIGTERM": 143}


def torchrun(nproc: int) -> list[str]:
    """Plain torch.distributed.run, as a user may start it instead of launch.py."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


class Launch:
    """e2e_trainer.py started in a session of its own (a killpg then reaches what a terminal's Ctrl-C
    would: the launcher and whatever shares its process group), its stdout and stderr in files: the
    ranks hold them, so a dead launcher's pipes would never close."""

    def __init__(self, out: Path, name: str, nproc: int, *extra: str, task: list[str] = SYNTHETIC, start=launcher):
        self.out, self.name = out, name
        self.run = out / name
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        self.stdout, self.stderr = out / f"{name}.out", out / f"{name}.err"
        with open(self.stdout, "w") as so, open(self.stderr, "w") as se:
            self.proc = subprocess.Popen(start(nproc) + ["e2e_trainer.py", *ARGS, *task, "-outputPath", str(out),
                                                            "-run_name", name, *extra],
                                         cwd=REPO, env=env, stdout=so, stderr=se, start_new_session=True)
        self.ranks: list[int] = [self.proc.pid] if nproc == 1 else []
        self.nproc = nproc

    def err(self) -> str:
        return self.stderr.read_text()

    def wait_for_checkpoint(self, timeout: float = 90) -> None:
        """Until checkpoints/latest.pt exists (written atomically: it is whole once it exists)."""
        latest = self.run / "checkpoints" / "latest.pt"
        deadline = time.monotonic() + timeout
        while not latest.exists():
            assert self.proc.poll() is None, f"the run ended before its first checkpoint:\n{self.err()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint after {timeout} s:\n{self.err()[-3000:]}"
            time.sleep(0.02)
        if not self.ranks:
            self.ranks = _children(self.proc.pid)
            assert len(self.ranks) == self.nproc and all("e2e_trainer.py" in _cmdline(p) for p in self.ranks), \
                [_cmdline(p) for p in self.ranks]

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit within {timeout} s of the signal:\n{self.err()[-3000:]}")

    def cleanup(self) -> None:
        """Kill what is left of this launch (only its own processes, by pid)."""
        for pid in [self.proc.pid, *self.ranks]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.poll()


@pytest.fixture
def launches():
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.cleanup()


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by whoever adopted it, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def _gone_after(pids: list[int], since: float, limit: float) -> dict[int, float]:
    """Seconds from ``since`` until each of ``pids`` exited (fails past ``limit``)."""
    gone: dict[int, float] = {}
    while len(gone) < len(pids):
        for pid in pids:
            if pid not in gone and not _alive(pid):
                gone[pid] = time.monotonic() - since
        assert time.monotonic() - since < limit, f"ranks still running {limit} s after: " \
                                                 f"{[p for p in pids if p not in gone]}"
        time.sleep(0.02)
    return gone


def _our_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "pfedsim:" in line]


def _no_traceback_of_ours(err: str) -> None:
    """No rank traceback (torch prefixes those with [rankN]:), no C++ warning with a stack of frames."""
    assert not re.search(r"^\[rank\d+\]:", err, re.M), err[-4000:]
    assert "Exception raised from" not in err and "frame #" not in err, err[-4000:]
    assert err.count("Traceback (most recent call last)") <= 1, err[-4000:]  # at most torchrun's own


def _interrupted_line(line: str, run: Path, signame: str) -> int:
    """The round that ``line`` names as interrupted; checks it names the run folder to resume."""
    found = re.fullmatch(rf"pfedsim: error: interrupted at round (\d+) by {signame}; continue with -resume "
                         rf"{re.escape(str(run))} \(its checkpoint of round (\d+)\)", line)
    assert found, line
    saved = torch.load(run / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)["round"]
    assert int(found[2]) == saved <= int(found[1]), (line, saved)
    return int(found[1])


@pytest.mark.timeout(120)
def test_every_rank_stops_within_10_s_of_its_launchers_death(tmp_path, launches):
    run = Launch(tmp_path, "orphaned", 2, *ENDLESS)
    launches.append(run)
    run.wait_for_checkpoint()
    run.proc.kill()  # SIGKILL: the launcher cannot forward anything
    killed = time.monotonic()
    run.wait()
    gone = _gone_after(run.ranks, killed, limit=10)
    print(f"ranks gone {sorted(round(s, 2) for s in gone.values())} s after the launcher's SIGKILL")
    err = run.err()
    _no_traceback_of_ours(err)
    lines = sorted(_our_lines(err))  # rank 0's line first
    assert len(lines) == 2, err[-4000:]
    died = f"the launcher (torch.distributed.run, pid {run.proc.pid}) died"
    assert lines[1] == f"pfedsim: error: rank 1: {died}; stopping", lines
    saved = torch.load(run.run / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)["round"]
    assert re.fullmatch(rf"pfedsim: error: rank 0: {re.escape(died)}; stopped at round \d+; continue with -resume "
                        rf"{re.escape(str(run.run))} \(its checkpoint of round {saved}\)", lines[0]), lines


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("start", [launcher, torchrun], ids=["launch.py", "torchrun"])
def test_ctrl_c_or_sigterm_under_a_launcher_prints_one_line_and_keeps_the_checkpoint(tmp_path, launches, signame,
                                                                                     start):
    """SIGINT to the whole process group, as a terminal's Ctrl-C (torchrun runs each rank in a
    session of its own, so the ranks get the SIGINT that torchrun forwards); SIGTERM to the launcher,
    which forwards it. The server says where to continue; the other rank says nothing. launch.py
    exits with the signal's status and adds nothing; plain torchrun exits 1 with its traceback."""
    run = Launch(tmp_path, signame, 2, *ENDLESS, start=start)
    launches.append(run)
    run.wait_for_checkpoint()
    if signame == "SIGINT":
        os.killpg(run.proc.pid, signal.SIGINT)
    else:
        run.proc.terminate()
    gone = _gone_after(run.ranks, time.monotonic(), limit=10)
    code = run.wait()
    print(f"ranks gone {sorted(round(s, 2) for s in gone.values())} s after {signame}")
    err = run.err()
    _no_traceback_of_ours(err)
    lines = _our_lines(err)
    assert len(lines) == 1, err[-4000:]
    _interrupted_line(lines[0], run.run, signame)
    if start is launcher:
        assert code == STATUS[signame] and err.strip() == lines[0], (code, err[-4000:])
    else:
        assert code == TORCHRUN_SIGNALLED, (code, err[-4000:])


@pytest.mark.timeout(60)
def test_ctrl_c_in_a_plain_process_exits_130_with_one_line(tmp_path, launches):
    run = Launch(tmp_path, "plain", 1, *ENDLESS)
    launches.append(run)
    run.wait_for_checkpoint()
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.wait() == 130
    err = run.err()
    assert "Traceback" not in err, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err[-3000:]
    _interrupted_line(err.strip(), run.run, "SIGINT")


@pytest.mark.timeout(120)
def test_sigterm_then_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, launches):
    """A plain process: SIGTERM exits 143 with one line; the -resume it names finishes the run, and
    the result equals a run never interrupted, bit for bit."""
    rounds = ["--set", f"server_config.max_iteration={ROUNDS}"]
    straight = Launch(tmp_path, "straight", 1, *rounds)
    run = Launch(tmp_path, "stopped", 1, *rounds)
    launches.extend([straight, run])
    run.wait_for_checkpoint()
    run.proc.terminate()
    assert run.wait() == 143
    err = run.err()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    stopped_at = _interrupted_line(err.strip(), run.run, "SIGTERM")
    assert stopped_at < ROUNDS
    again = Launch(tmp_path, "stopped", 1, *rounds, "-resume", str(run.run))
    launches.append(again)
    assert again.wait(timeout=90) == 0, again.err()[-3000:]
    assert straight.wait(timeout=90) == 0, straight.err()[-3000:]
    a, b = (torch.load(r / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
            for r in (tmp_path / "straight", run.run))
    assert a["round"] == b["round"] == ROUNDS
    assert torch.equal(a["global"], b["global"]), (a["global"] - b["global"]).abs().max().item()


@pytest.mark.timeout(120)
def test_sigterm_after_a_worker_died_does_not_hide_the_failure(tmp_path, launches):
    """torch.distributed.run sends SIGTERM to the other ranks once one died (rank 2 of 3 here, in its
    first training step, with ``os._exit(3)``): that SIGTERM is the failure's fallout, so the server
    still names the dead rank, and no rank claims to have been interrupted. launch.py exits with
    the dead rank's status and names it in one line, since that rank printed nothing."""
    run = Launch(tmp_path, "dying", 3, task=DYING)
    launches.append(run)
    code = run.wait(timeout=90)
    err = run.err()
    assert code == 3, (code, err[-4000:])
    _no_traceback_of_ours(err)
    lines = _our_lines(err)
    assert not [l for l in lines if "interrupted" in l], err[-4000:]
    assert any(l.startswith("pfedsim: error: round 1 reduce failed on the server: rank 2 stopped at") for l in lines), \
        err[-4000:]
    assert re.fullmatch(r"pfedsim: error: rank 2 \(pid \d+\) exited with status 3", lines[-1]), err[-4000:]
