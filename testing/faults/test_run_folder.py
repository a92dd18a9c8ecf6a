"""A run folder belongs to one run at a time, and a full disk costs one line and no partial file."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from core.errors import UserError
from testing.conftest import REPO, load_ckpt
from core.files import DiskFull, append_line, disk_guard
from utils.run_lock import RunLock

SYNTHETIC = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")


def _start(out, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "e2e_trainer.py", *SYNTHETIC, "-outputPath", str(out), *args],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attempt", range(2))
def test_two_simultaneous_starts_one_runs_one_is_refused(tmp_path, attempt):
    """Same -run_name, two seeds, started together, first evaluation late (round 10): one run owns
    the folder to its end; the other is refused in one line, exit 2, and wrote nothing there."""
    late = ["-run_name", "same", "--set", "server_config.max_iteration=20", "--set", "server_config.val_freq=10"]
    procs = [_start(tmp_path, *late, "-seed", str(seed)) for seed in (1, 2)]
    results = [(p.wait(timeout=240), p.communicate()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-1500:] for _, (_, err) in results]
    winner = [i for i, (code, _) in enumerate(results) if code == 0][0]
    loser_err = results[1 - winner][1][1]
    lines = _error_lines(loser_err)
    assert len(lines) == 1 and "is in use by another run (host" in lines[0], loser_err
    run_dir = tmp_path / "same"
    assert yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["seed"] == winner + 1
    info = json.loads((run_dir / "run.json").read_text())
    assert len(info["commands"]) == 1 and f"-seed {winner + 1}" in info["commands"][0]
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    assert load_ckpt(run_dir)["config"]["seed"] == winner + 1


def test_lock_is_refused_while_held_and_free_after_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils.run_lock import RunLock; "
                               f"RunLock({str(tmp_path / 'r')!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            RunLock(tmp_path / "r").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path / "r"):  # the OS let go of the dead holder's lock: never stale
        assert (tmp_path / "r" / "run.lock").is_file()


def test_refused_start_leaves_nothing(tmp_path):
    lock = RunLock(tmp_path / "out" / "r").acquire()
    lock.release(discard=True)
    assert not (tmp_path / "out" / "r").exists()


# ---- a real full disk: a small tmpfs ------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (mounting needs root and a kernel that allows it; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder, leave: int) -> None:
    """Fill ``folder``'s device, leaving about ``leave`` bytes free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def test_a_line_that_does_not_fit_is_not_written_in_part(small_disk):
    path = small_disk / "metrics.jsonl"
    path.write_text('{"round": 1}\n')
    _fill(small_disk, 0)
    with pytest.raises(DiskFull, match=f"while writing metrics.jsonl"):
        append_line(path, '{"round": 2, "padding": "' + "x" * 10_000 + '"}')
    assert path.read_text() == '{"round": 1}\n'


LONG = ["--set", "server_config.max_iteration=12", "--set", "server_config.val_freq=1", "--set",
        "server_config.ckpt_freq=1"]


@pytest.mark.timeout(400)
def test_full_disk_mid_run_is_one_line_and_resumes_exactly(small_disk, tmp_path):
    reference = _start(tmp_path / "ref", "-run_name", "r", *LONG)
    assert reference.wait(timeout=240) == 0, reference.communicate()[1][-2000:]
    _fill(small_disk, 200_000)  # room for the start and round 1 (two 82 kB checkpoints), not for a third file
    proc = _start(small_disk / "out", "-run_name", "r", *LONG)
    _, err = proc.communicate(timeout=240)
    lines = _error_lines(err)
    assert proc.returncode == 1 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"pfedsim: error: no space left on the device of {small_disk / 'out' / 'r'}"), lines
    assert "bytes needed" in lines[0] and "-resume" in lines[0]
    run_dir = small_disk / "out" / "r"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")], files
    assert not [p for p in files if p.stat().st_size == 0 and p.name != "run.lock"], files
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # whole lines only
    stopped_at = load_ckpt(run_dir)["round"]
    assert 1 <= stopped_at < 12 and len(rows) >= stopped_at
    (small_disk / "filler").unlink()
    resumed = _start(small_disk / "out", "-run_name", "r", "-resume", *LONG)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, 13)), "rows past the checkpoint were trimmed at resume, none doubled"
    assert torch.equal(load_ckpt(run_dir)["global"], load_ckpt(tmp_path / "ref" / "r")["global"])


@pytest.mark.timeout(120)
def test_full_disk_at_start_leaves_no_partial_file(small_disk):
    _fill(small_disk, 0)
    proc = _start(small_disk / "out", "-run_name", "r")
    _, err = proc.communicate(timeout=100)
    lines = _error_lines(err)
    assert proc.returncode == 1 and len(lines) == 1 and "no space left on the device" in lines[0], err[-2000:]
    left = [p for p in (small_disk / "out").rglob("*") if p.is_file()] if (small_disk / "out").exists() else []
    assert left == [], left


def test_an_error_raised_while_handling_a_full_disk_is_a_full_disk(tmp_path):
    """torch.save's zip writer replaces the ENOSPC OSError by its own RuntimeError when it closes
    (depending on where in the file the disk filled): that is still a full disk, one line."""
    import errno

    target = tmp_path / "latest.pt"
    partial = tmp_path / "latest.pt.tmp"
    partial.write_bytes(b"half")
    with pytest.raises(DiskFull, match="while writing latest.pt"):
        with disk_guard(target, 100, partial):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 26880 vs 26808")
    assert not partial.exists()
    with pytest.raises(RuntimeError, match="unrelated"):
        with disk_guard(target, 100, partial):
            raise RuntimeError("unrelated")
