"""pfedsim entry point: federated training with personalization, FLUTE-style command line.

    python e2e_trainer.py -dataPath DATA -outputPath OUT -config experiments/cv/config_cpu.yaml -task cv
    python -m torch.distributed.run --nproc_per_node=4 e2e_trainer.py ... -backend nccl
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

from core.config import load_config
from core.distributed import PeerFailure, mpi_environment
from core.errors import RunStopped, UserError
from core.task import load_task
from core.checkpoint import check_resumable
from utils.cli import OneLineParser
from core.files import FULL, DiskFull, free_bytes, write_text_atomic
from utils.run_lock import RunLock
from utils.experiment import write_run_info


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="e2e_trainer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-dataPath", required=True, help="folder holding the task's data (for cv: cifar-10-batches-py)")
    p.add_argument("-outputPath", required=True, help="folder for runs; each run writes OUT/<run name>/")
    p.add_argument("-config", required=True, help="experiment YAML, e.g. experiments/cv/config.yaml")
    p.add_argument("-task", required=True, help="task folder name under experiments/ (e.g. cv) or a path to one")
    p.add_argument("-backend", default="gloo", choices=["gloo", "nccl"],
                   help="torch.distributed backend when launched with several processes (default gloo)")
    p.add_argument("-seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("-run_name", default=None,
                   help="run folder name (default: <config name>_<task>_<date-time>)")
    p.add_argument("-resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run: a checkpoint file or run folder; alone, the -run_name folder's latest.pt")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML syntax), repeatable, e.g. --set server_config.max_iteration=5")
    return p


def _resume_path(args, cfg, run_dir: Path) -> Path | None:
    """The checkpoint to continue: -resume PATH; a bare -resume, the run folder's latest.pt; else
    ``server_config.resume_from_checkpoint``; a folder means its checkpoints/latest.pt."""
    target = str(run_dir) if args.resume == "" else args.resume or cfg.server_config.resume_from_checkpoint
    if target is None:
        return None
    path = Path(target)
    return path / "checkpoints" / "latest.pt" if path.is_dir() else path


def _check_names(args, resume: str | None, logging=None) -> None:
    """Mistakes found before anything is written: an -outputPath that is empty or a file, a -run_name
    that is empty or a path, a bare -resume with no run to continue, and ``logging`` (the config's
    ``logging_config``) asking for W&B when the wandb package is missing.

    Raises:
        UserError: naming the flag (or config key) and the fix.
    """
    if not args.outputPath.strip():
        raise UserError("-outputPath is empty; pass the folder for runs, e.g. -outputPath runs "
                        "(-outputPath . for the current folder)")
    if args.run_name is not None and not args.run_name.strip():
        raise UserError("-run_name is empty; pass a folder name, or leave -run_name out for "
                        "<config name>_<task>_<date-time>")
    if Path(args.outputPath).exists() and not Path(args.outputPath).is_dir():
        raise UserError(f"-outputPath {args.outputPath} is a file; pass a folder (it is created if missing)")
    if args.run_name and (Path(args.run_name).name != args.run_name or args.run_name in (".", "..")):
        raise UserError(f"-run_name {args.run_name!r} must be a plain folder name (no '/' or '..'); "
                        f"runs go to -outputPath/<run name>")
    if args.resume == "" and not args.run_name and not resume:
        raise UserError("-resume without a path continues the -run_name folder; pass -run_name NAME, "
                        "or -resume RUN_FOLDER")
    from utils.metrics_writer import check_wandb
    check_wandb(logging)


def _run_dir(args, cfg) -> Path:
    """OUT/<run name>: -run_name, else the folder of the run resumed, else <config>_<task>_<time>.

    Raises:
        UserError: see :func:`_check_names`.
    """
    resume = args.resume or cfg.server_config.resume_from_checkpoint
    _check_names(args, resume, cfg.logging_config)
    if args.run_name:
        name = args.run_name
    elif resume:
        path = Path(resume)
        name = path.name if path.is_dir() else path.parent.parent.name
    else:
        name = f"{Path(args.config).stem}_{Path(args.task).name}_{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(args.outputPath) / name


def _check_run_folder(run_dir: Path, resume: Path | None) -> None:
    """Never overwrite results: a run folder that holds them may only be continued from one of its
    own checkpoints."""
    if not (run_dir / "metrics.jsonl").exists():
        return
    if resume is None:
        raise UserError(f"run folder {run_dir} already holds results; pass -resume to continue it "
                        f"or choose another -run_name")
    if run_dir.resolve() not in resume.resolve().parents:
        raise UserError(f"run folder {run_dir} already holds the results of a run other than {resume}; "
                        f"choose a new -run_name to continue {resume} there, or -resume {run_dir} to continue "
                        f"this one")


def _start_run(run_dir: Path, sim, task, args, argv: list[str], resume: Path | None, lock: RunLock) -> None:
    """Rank 0, once every rank is up (a UserError here stops them all at once; only the server reads
    the run folder): lock the run folder (refused while another run holds it); refuse to overwrite
    another run's results, and a checkpoint that is missing, of another config or model, or past the
    last round; then record the run (config.resolved.yaml, run.json). Nothing is written before the
    checks pass (a refused start takes its lock file, and the folder it created, away again)."""
    lock.acquire()
    try:
        _check_run_folder(run_dir, resume)
        if resume is not None:
            width = sim.personal_numel + sim.strategy.client_state_numel(sim.layout) \
                + sim.personalization.model_state_numel(sim.layout)
            check_resumable(resume, sim.cfg, sim.layout.numel, store_width=width)
    except UserError:
        lock.release(discard=True)
        raise
    try:
        write_text_atomic(run_dir / "config.resolved.yaml", yaml.safe_dump(sim.cfg.to_dict(), sort_keys=False))
        write_run_info(run_dir, task, args.dataPath, argv, int(os.environ.get("WORLD_SIZE", 1)))
    except DiskFull:
        if resume is None:  # a new run leaves nothing behind; a resumed one keeps its files as they were
            (run_dir / "config.resolved.yaml").unlink(missing_ok=True)
            lock.release(discard=True)
        raise


def _train(args, argv: list[str]) -> None:
    """Load the task and config, then run (or resume) the experiment with the run folder locked."""
    mpi_environment()
    task = load_task(args.task)
    cfg = load_config(args.config, args.overrides, args.seed)
    run_dir = _run_dir(args, cfg)
    resume = _resume_path(args, cfg, run_dir)
    lock = RunLock(run_dir, f"-outputPath {args.outputPath}")
    from core.runner import run_experiment
    from utils.outputs import run_outputs
    try:
        run_experiment(cfg, task, args.dataPath, run_dir, args.backend, resume,
                       on_start=lambda sim: _start_run(run_dir, sim, task, args, argv, resume, lock),
                       observers=lambda: run_outputs(run_dir, cfg))
    finally:
        lock.release()


def _say(message: str) -> None:
    """Print ``pfedsim: error: <message>`` on stderr in one write, so that the lines of several ranks
    sharing one stderr never run into each other (print() may write the newline separately)."""
    sys.stderr.write(f"pfedsim: error: {message}\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    """Run e2e_trainer with ``argv``; returns the exit status (see docs/reliability.md)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        _train(args, argv)
    except RunStopped as exc:  # UserError (2), divergence, interrupts: one line, no traceback
        if str(exc):
            _say(str(exc))
        return exc.exit_code
    except PeerFailure as exc:
        _say(str(exc))
        return 1
    except KeyboardInterrupt:  # before the run's own handlers were in place
        _say("interrupted while starting, before round 1")
        return 130
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        where = Path(exc.filename or args.outputPath)
        _say(f"no space left on the device of {where} ({free_bytes(where.parent):,} bytes free); "
             f"free space there, then continue the run with -resume")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
