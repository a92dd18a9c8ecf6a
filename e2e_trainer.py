"""pfedsim entry point: federated training with personalization, FLUTE-style command line.

    python e2e_trainer.py -dataPath DATA -outputPath OUT -config experiments/cv/config_cpu.yaml -task cv
    python -m torch.distributed.run --nproc_per_node=4 e2e_trainer.py ... -backend nccl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.config import load_config
from core.distributed import PeerFailure, mpi_environment
from core.errors import RunStopped
from core.task import load_task
from utils.cli import OneLineParser
from core.files import FULL, free_bytes
from utils.metrics_writer import check_wandb
from utils.run_folder import RunFolder


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="e2e_trainer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-dataPath", default=None,
                   help="folder holding the task's data (for cv: cifar-10-batches-py); a task that reads no files "
                        "(synthetic) needs none")
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


def _train(args, argv: list[str]) -> None:
    """Load the task and config, resolve the run folder, then run (or resume) the experiment; the
    folder's observer locks and checks it, and records the run, once every rank is up.

    Raises:
        UserError: a mistake in the command line, config, task, data or run folder (nothing written).
    """
    mpi_environment()
    task = load_task(args.task)
    cfg = load_config(args.config, args.overrides, args.seed)
    folder = RunFolder.resolve(args.outputPath, args.run_name, args.config, args.task, args.resume,
                               cfg.server_config.resume_from_checkpoint)
    check_wandb(cfg.logging_config)
    from core.runner import run_experiment
    from utils.outputs import OpenedLater, run_outputs
    try:
        run_experiment(cfg, task, args.dataPath, folder.path, args.backend, folder.resume,
                       observers=lambda: [folder.opener(cfg, task, args.dataPath, argv),
                                          OpenedLater(lambda: run_outputs(folder.path, cfg))])
    finally:
        folder.release()


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
