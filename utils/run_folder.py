"""A run folder ``OUT/<run name>``: its files, the checkpoint a run continues, its lock, its run.json.

:class:`RunFolder` is built before the engine (``e2e_trainer.py``), and by every tool that reads or
names a run folder (``evaluate.py``, ``submit.py``, :class:`utils.experiment.Experiment`). When the
engine has built a run on every rank, :meth:`RunFolder.opener`'s observer claims the folder (the
lock, the refusal of another run's results and of a checkpoint this run cannot continue) and records
the run (``config.resolved.yaml``, ``run.json``); nothing is written before those checks pass.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import time
from importlib import metadata
from pathlib import Path

import yaml

from core.checkpoint import check_resumable
from core.errors import UserError
from core.files import DiskFull, write_text_atomic
from core.observers import RunObserver, RunStart
from core.task import EXPERIMENTS_DIR
from utils.run_lock import RunLock

RUN_INFO = "run.json"
CONFIG = "config.resolved.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = {"last": "latest.pt", "best": "best.pt"}  # a reload name -> its file under checkpoints/


class RunFolder:
    """The folder of one run and, for a run being started, the checkpoint it continues.

    Args:
        path: ``OUT/<run name>``.
        resume: the checkpoint the run continues (None: a new run, or a folder only read).
        what: the flag the folder came from, for the message when it cannot be created.

    Raises:
        UserError: from :meth:`resolve`, :meth:`claim` and :meth:`read_info` (each says when).
        DiskFull: from :meth:`record`.
    """

    def __init__(self, path: str | Path, resume: Path | None = None, what: str = "-outputPath"):
        self.path = Path(path)
        self.resume = resume
        self.what = what
        self._lock: RunLock | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, resume={self.resume!r})"

    # ---- the files ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def run_info(self) -> Path:
        return self.path / RUN_INFO

    @property
    def submitit(self) -> Path:
        return self.path / "submitit"

    def checkpoint(self, reload: str = "last") -> Path:
        """``checkpoints/latest.pt`` (``reload`` ``last``) or ``checkpoints/best.pt`` (``best``)."""
        return self.path / "checkpoints" / CHECKPOINTS[reload]

    @property
    def latest(self) -> Path:
        return self.checkpoint("last")

    # ---- which folder, which checkpoint -------------------------------------------------------
    @staticmethod
    def default_name(config: str, task: str) -> str:
        """``<config name>_<task>_<date-time>``, the name of a run given no -run_name."""
        return f"{Path(config).stem}_{Path(task).name}_{time.strftime('%Y%m%d-%H%M%S')}"

    @classmethod
    def resolve(cls, output_path: str, run_name: str | None, config: str, task: str, resume: str | None,
                configured: str | None = None) -> "RunFolder":
        """The folder of a command line and the checkpoint it continues.

        The folder is OUT/``run_name``; without one, the folder of the run resumed, else
        ``<config name>_<task>_<date-time>``. ``resume`` is -resume's value (None: not given; ``""``:
        given alone), ``configured`` is ``server_config.resume_from_checkpoint``; see :meth:`resume_target`.

        Raises:
            UserError: an -outputPath that is empty or a file, a -run_name that is empty or a path,
                a bare -resume with no -run_name to continue.
        """
        named = resume or configured
        _check_names(output_path, run_name, resume, named)
        if run_name:
            name = run_name
        elif named:
            path = Path(named)
            name = path.name if path.is_dir() else path.parent.parent.name
        else:
            name = cls.default_name(config, task)
        folder = cls(Path(output_path) / name, what=f"-outputPath {output_path}")
        folder.resume = folder.resume_target(resume, configured)
        return folder

    def resume_target(self, resume: str | None, configured: str | None = None) -> Path | None:
        """The checkpoint to continue: -resume PATH; a bare -resume (``""``), this folder's latest.pt;
        else ``configured`` (``server_config.resume_from_checkpoint``); a folder means its
        checkpoints/latest.pt. None: a new run."""
        target = str(self.path) if resume == "" else resume or configured
        if target is None:
            return None
        path = Path(target)
        return RunFolder(path).latest if path.is_dir() else path

    # ---- starting a run in it -----------------------------------------------------------------
    def check_unused(self) -> None:
        """Never overwrite results: a folder that holds them may only be continued from one of its own
        checkpoints.

        Raises:
            UserError: the folder holds results and the run is new, or continues another folder's checkpoint.
        """
        if not self.metrics.exists():
            return
        if self.resume is None:
            raise UserError(f"run folder {self.path} already holds results; pass -resume to continue it "
                            f"or choose another -run_name")
        if self.path.resolve() not in self.resume.resolve().parents:
            raise UserError(f"run folder {self.path} already holds the results of a run other than {self.resume}; "
                            f"choose a new -run_name to continue {self.resume} there, or -resume {self.path} to "
                            f"continue this one")

    def claim(self, cfg, state_numel: int, store_width: int) -> None:
        """Lock the folder, then refuse another run's results and a checkpoint this run cannot continue
        (missing or damaged, another config or model, past the last round: see
        :func:`core.checkpoint.check_resumable`). A refused claim leaves nothing behind (its lock file,
        and the folders it created, go again).

        Raises:
            UserError: another live run holds the folder, or a refusal above.
        """
        self._lock = RunLock(self.path, self.what)
        self._lock.acquire()
        try:
            self.check_unused()
            if self.resume is not None:
                check_resumable(self.resume, cfg, state_numel, store_width=store_width)
        except UserError:
            self.release(discard=True)
            raise

    def record(self, cfg, task, data_path: str | None, argv: list[str], world_size: int) -> None:
        """Write ``config.resolved.yaml`` and ``run.json`` (see :meth:`write_info`).

        Raises:
            DiskFull: no room for them; a new run then leaves nothing behind, a resumed one keeps its
                files as they were.
        """
        try:
            write_text_atomic(self.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.write_info(task, data_path, argv, world_size)
        except DiskFull:
            if self.resume is None:
                self.config.unlink(missing_ok=True)
                self.release(discard=True)
            raise

    def release(self, discard: bool = False) -> None:
        """Let the lock go (``discard``: the run wrote nothing; see :meth:`RunLock.release`)."""
        if self._lock is not None:
            self._lock.release(discard)

    def opener(self, cfg, task, data_path: str | None, argv: list[str]) -> RunObserver:
        """The observer that claims this folder and records the run when the engine opens it."""
        return _Opener(self, cfg, task, data_path, argv)

    # ---- run.json -----------------------------------------------------------------------------
    def write_info(self, task, data_path: str | None, argv: list[str], world_size: int = 1) -> None:
        """Write ``run.json``: what rebuilding the run needs besides its config.

        Keys: ``task`` (a name under experiments/ or an absolute task folder), ``dataPath`` (absolute;
        null for a run given no -dataPath), ``commands`` (every command line that started or resumed
        the run, oldest first), ``world_sizes`` (the number of processes of each of those commands),
        the pfedsim version and git commit.
        """
        old = json.loads(self.run_info.read_text()) if self.run_info.is_file() else {}
        commands = old.get("commands", [])
        info = {"task": task.name if task.folder.parent == EXPERIMENTS_DIR else str(task.folder),
                "dataPath": None if data_path is None else str(Path(data_path).resolve()),
                "commands": commands + [shlex.join(["e2e_trainer.py"] + list(argv))],
                "world_sizes": old.get("world_sizes", [None] * len(commands)) + [world_size], **_version()}
        write_text_atomic(self.run_info, json.dumps(info, indent=1) + "\n")

    def read_info(self) -> dict:
        """The run's ``run.json`` as a dict.

        Raises:
            UserError: when the file is missing (a run made before pfedsim wrote it).
        """
        if not self.run_info.is_file():
            raise UserError(f"{self.run_info} not found (run made before pfedsim recorded its task and data); "
                            f"pass -task T and -dataPath D (Experiment(..., task=, data_path=))")
        return json.loads(self.run_info.read_text())


class _Opener(RunObserver):
    """Rank 0's first observer of a command-line run: once every rank has built the run (before the
    server reads a checkpoint or writes anything), claim the folder and record the run.

    Raises (from :meth:`opening`):
        UserError: the claim is refused (:meth:`RunFolder.claim`); the engine then stops every rank at once.
        DiskFull: no room for config.resolved.yaml or run.json (:meth:`RunFolder.record`).
    """

    def __init__(self, folder: RunFolder, cfg, task, data_path: str | None, argv: list[str]):
        self.folder, self.cfg, self.task, self.data_path, self.argv = folder, cfg, task, data_path, list(argv)

    def opening(self, start: RunStart) -> None:
        self.folder.claim(self.cfg, start.state_numel, start.store_width)
        self.folder.record(self.cfg, self.task, self.data_path, self.argv, start.world_size)


def _check_names(output_path: str, run_name: str | None, resume: str | None, named: str | None) -> None:
    """Mistakes found before anything is written: an -outputPath that is empty or a file, a -run_name
    that is empty or a path, a bare -resume (``resume == ""``) with neither a -run_name nor a
    configured checkpoint (``named``) to continue.

    Raises:
        UserError: naming the flag and the fix.
    """
    if not output_path.strip():
        raise UserError("-outputPath is empty; pass the folder for runs, e.g. -outputPath runs "
                        "(-outputPath . for the current folder)")
    if run_name is not None and not run_name.strip():
        raise UserError("-run_name is empty; pass a folder name, or leave -run_name out for "
                        "<config name>_<task>_<date-time>")
    if Path(output_path).exists() and not Path(output_path).is_dir():
        raise UserError(f"-outputPath {output_path} is a file; pass a folder (it is created if missing)")
    if run_name and (Path(run_name).name != run_name or run_name in (".", "..")):
        raise UserError(f"-run_name {run_name!r} must be a plain folder name (no '/' or '..'); "
                        f"runs go to -outputPath/<run name>")
    if resume == "" and not run_name and not named:
        raise UserError("-resume without a path continues the -run_name folder; pass -run_name NAME, "
                        "or -resume RUN_FOLDER")


def _version() -> dict:
    """pfedsim's installed version and the git commit of this checkout (None when unknown)."""
    try:
        version = metadata.version("pfedsim")
    except metadata.PackageNotFoundError:
        version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                                capture_output=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"pfedsim_version": version, "git_commit": commit}
