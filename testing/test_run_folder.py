"""The run folder as one class (issue 24 point 3): which folder and checkpoint a command line means,
the refusal of a second run, run.json written and read back, and a task that reads no files run
without -dataPath."""
from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import pytest

import e2e_trainer
from core.errors import UserError
from core.runner import run_experiment
from core.task import load_task
from testing.conftest import failure_text, run_trainer
from utils.experiment import Experiment
from utils.run_folder import RunFolder
from utils.run_lock import RunLock

SYNTHETIC = ["-config", "experiments/synthetic/config.yaml", "-task", "synthetic"]
SHORT = ["--set", "server_config.max_iteration=2", "--set", "server_config.val_freq=2", "--set",
         "server_config.ckpt_freq=2"]


def _resolve(out: Path, run_name=None, resume=None, configured=None) -> RunFolder:
    return RunFolder.resolve(str(out), run_name, "experiments/cv/config_cpu.yaml", "cv", resume, configured)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A 2-round synthetic run, started without -dataPath, checkpointed at round 2."""
    out = tmp_path_factory.mktemp("runs")
    assert e2e_trainer.main(["-outputPath", str(out), *SYNTHETIC, "-run_name", "done", *SHORT]) == 0
    return out / "done"


# ---- which folder, which checkpoint ------------------------------------------------------------
def test_a_new_run_gets_its_name_and_no_checkpoint(tmp_path):
    named = _resolve(tmp_path, run_name="mine")
    assert named.path == tmp_path / "mine" and named.resume is None
    unnamed = _resolve(tmp_path)
    assert unnamed.name.startswith("config_cpu_cv_") and unnamed.path.parent == tmp_path
    time.strptime(unnamed.name.removeprefix("config_cpu_cv_"), "%Y%m%d-%H%M%S")


def test_bare_resume_continues_the_run_name_folder(tmp_path):
    missing = _resolve(tmp_path, run_name="r", resume="")  # no such run: its path, refused later as not found
    assert missing.path == tmp_path / "r" and missing.resume == tmp_path / "r"
    (tmp_path / "r").mkdir()
    folder = _resolve(tmp_path, run_name="r", resume="")
    assert folder.path == tmp_path / "r" and folder.resume == tmp_path / "r" / "checkpoints" / "latest.pt"


def test_bare_resume_without_a_run_name_is_refused(tmp_path):
    with pytest.raises(UserError, match="-resume without a path continues the -run_name folder"):
        _resolve(tmp_path, resume="")


def test_resume_of_a_folder_or_file_names_the_run_after_it(finished, tmp_path):
    by_folder = _resolve(tmp_path, resume=str(finished))
    assert by_folder.path == tmp_path / "done" and by_folder.resume == finished / "checkpoints" / "latest.pt"
    checkpoint = finished / "checkpoints" / "best.pt"
    by_file = _resolve(tmp_path, resume=str(checkpoint))
    assert by_file.path == tmp_path / "done" and by_file.resume == checkpoint
    renamed = _resolve(tmp_path, run_name="other", resume=str(checkpoint))
    assert renamed.path == tmp_path / "other" and renamed.resume == checkpoint


def test_the_configured_checkpoint_counts_as_resume(finished, tmp_path):
    configured = _resolve(tmp_path, configured=str(finished))
    assert configured.path == tmp_path / "done" and configured.resume == finished / "checkpoints" / "latest.pt"
    flag_wins = _resolve(tmp_path, resume=str(finished / "checkpoints" / "best.pt"), configured=str(finished))
    assert flag_wins.resume == finished / "checkpoints" / "best.pt"
    bare = _resolve(finished.parent, resume="", configured=str(finished / "checkpoints" / "best.pt"))
    assert bare.path == finished and bare.resume == finished / "checkpoints" / "latest.pt", "the folder's latest.pt"


@pytest.mark.parametrize("output, name, needle", [("", None, "-outputPath is empty"),
                                                  ("runs", " ", "-run_name is empty"),
                                                  ("runs", "a/b", "must be a plain folder name"),
                                                  ("runs", "..", "must be a plain folder name")])
def test_bad_names_are_refused(tmp_path, monkeypatch, output, name, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=needle):
        RunFolder.resolve(output, name, "c.yaml", "cv", None)
    assert list(tmp_path.iterdir()) == []


def test_paths():
    folder = RunFolder("runs/r")
    assert (folder.config, folder.metrics, folder.run_info) == (
        Path("runs/r/config.resolved.yaml"), Path("runs/r/metrics.jsonl"), Path("runs/r/run.json"))
    assert folder.checkpoint("best") == Path("runs/r/checkpoints/best.pt") == folder.latest.with_name("best.pt")


# ---- one run at a time, never over another's results --------------------------------------------
def test_a_second_run_is_refused_while_the_first_holds_the_folder(finished, tmp_path):
    cfg = Experiment(finished).config
    first = RunFolder(tmp_path / "busy")
    first.claim(cfg, 1, 0)
    try:
        with pytest.raises(UserError, match="is in use by another run"):
            RunFolder(tmp_path / "busy").claim(cfg, 1, 0)
    finally:
        first.release()
    second = RunFolder(tmp_path / "busy")
    second.claim(cfg, 1, 0)  # the first let go
    second.release()


def test_a_refusal_names_a_holder_that_writes_its_line_a_moment_after_locking(tmp_path):
    """The race CI met: the second run reads the lock file between the first's flock and its write.
    It waits for the line (here written 0.2 s after the lock) instead of saying "holder unknown"."""
    import fcntl
    import os
    import threading

    folder = tmp_path / "racy"
    folder.mkdir()
    fd = os.open(folder / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: conflicts within a process too
    writer = threading.Timer(0.2, lambda: os.pwrite(fd, b"host elsewhere, pid 42\n", 0))
    writer.start()
    try:
        with pytest.raises(UserError, match=r"in use by another run \(host elsewhere, pid 42\)"):
            RunLock(folder).acquire()
    finally:
        writer.join()
        os.close(fd)


def test_results_are_never_overwritten_and_a_refusal_leaves_nothing(finished, tmp_path):
    cfg = Experiment(finished).config
    before = sorted(p.name for p in finished.iterdir())
    with pytest.raises(UserError, match="already holds results; pass -resume"):
        RunFolder(finished).claim(cfg, 1, 0)
    assert sorted(p.name for p in finished.iterdir()) == before
    with RunLock(finished):  # the refused claim let the lock go
        pass
    elsewhere = tmp_path / "elsewhere" / "checkpoints" / "latest.pt"
    with pytest.raises(UserError, match="already holds the results of a run other than"):
        RunFolder(finished, resume=elsewhere).claim(cfg, 1, 0)
    with pytest.raises(UserError, match="its global model holds"):
        RunFolder(tmp_path / "new", resume=finished / "checkpoints" / "latest.pt").claim(cfg, 1, 0)
    assert not (tmp_path / "new").exists(), "a refused claim takes away the folder it made"


def test_the_engine_opens_the_run_to_observers_not_to_a_callback():
    assert "on_start" not in inspect.signature(run_experiment).parameters
    assert hasattr(RunFolder("r").opener(None, None, None, []), "opening")


def test_a_refused_resume_through_the_engine_writes_nothing(finished, tmp_path):
    """-resume of a checkpoint into a new folder with another config: exit 2, no folder made."""
    code = e2e_trainer.main(["-outputPath", str(tmp_path), *SYNTHETIC, "-run_name", "x", "-resume", str(finished),
                             "--set", "data_config.alpha=0.9", *SHORT])
    assert code == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.timeout(300)
def test_two_processes_refused_at_opening_stop_at_once(finished):
    """The folder's refusal comes from rank 0's observer; the worker is told to stop with it."""
    started = time.monotonic()
    proc = run_trainer(["-outputPath", str(finished.parent), *SYNTHETIC, "-run_name", "done", *SHORT],
                       nproc=2, timeout=240)
    assert proc.returncode == 2, failure_text(proc)
    assert "already holds results" in proc.stderr and time.monotonic() - started < 120


# ---- run.json ------------------------------------------------------------------------------------
def test_run_json_round_trip(tmp_path):
    folder, task = RunFolder(tmp_path / "r"), load_task("synthetic")
    folder.path.mkdir()
    folder.write_info(task, "data", ["-run_name", "r"], 2)
    folder.write_info(task, None, ["-run_name", "r", "-resume"], 1)
    info = folder.read_info()
    assert info == json.loads(folder.run_info.read_text())
    assert info["task"] == "synthetic" and info["dataPath"] is None, "the last command's data path"
    assert info["commands"] == ["e2e_trainer.py -run_name r", "e2e_trainer.py -run_name r -resume"]
    assert info["world_sizes"] == [2, 1] and "git_commit" in info and "pfedsim_version" in info
    folder.write_info(task, "data", [], 1)
    assert folder.read_info()["dataPath"] == str((Path.cwd() / "data").resolve())


def test_a_missing_run_json_is_one_line(tmp_path):
    with pytest.raises(UserError, match="run.json not found .* pass -task T and -dataPath D"):
        RunFolder(tmp_path).read_info()


# ---- a task that reads no files ------------------------------------------------------------------
def test_a_task_without_files_runs_and_reloads_without_data_path(finished):
    info = json.loads((finished / "run.json").read_text())
    assert info["dataPath"] is None and "-dataPath" not in info["commands"][0]
    record, _, _ = Experiment(finished).evaluate("last")
    recorded = json.loads((finished / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["global_test_acc"] == pytest.approx(recorded["global_test_acc"], abs=1e-9)


def test_a_task_that_reads_files_asks_for_data_path():
    load_task("synthetic").check_data_path(None)
    with pytest.raises(UserError, match="-task cv reads its data from files.*pass -dataPath FOLDER"):
        load_task("cv").check_data_path(None)
    load_task("cv").check_data_path("somewhere")
