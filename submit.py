"""Submit pfedsim to SLURM (or run it locally) through submitit, one task per GPU, with requeue.

    python submit.py --nodes 2 --gpus 4 --partition P -config C -task cv -dataPath D -outputPath O \\
        [--time MIN] [--executor slurm|local] [trainer args: -seed, -run_name, --set key=value, ...]

Each task runs ``e2e_trainer.main`` with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
derived from the SLURM environment by ``submitit.JobEnvironment``. On preemption or time-out,
submitit calls :meth:`TrainerJob.checkpoint` and requeues the job; the requeued job continues from
``OUT/<run name>/checkpoints/latest.pt`` when it exists (the rounds since that checkpoint are redone,
exactly as the interrupted run would have done them).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

from core.errors import UserError
from utils.cli import OneLineParser, check_writable
from utils.run_folder import RunFolder

REPO = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="submit.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="Any other argument is passed to e2e_trainer.py unchanged.")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1; the local executor takes 1)")
    p.add_argument("--gpus", type=int, default=0,
                   help="GPUs per node, one task per GPU (default 0: CPU tasks, see --tasks_per_node)")
    p.add_argument("--tasks_per_node", type=int, default=None,
                   help="processes per node (default: --gpus, or 1 without GPUs)")
    p.add_argument("--cpus_per_task", type=int, default=4, help="CPU cores per task (default 4)")
    p.add_argument("--partition", default=None, help="SLURM partition (slurm executor)")
    p.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit per attempt in minutes (default 60)")
    p.add_argument("--executor", default="slurm", choices=["slurm", "local"],
                   help="slurm (sbatch) or local (submitit's local executor, one node; for tests)")
    p.add_argument("--max_timeouts", type=int, default=20,
                   help="requeues after a time-out before giving up (preemptions do not count; default 20)")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit status 1 if it failed")
    for name in ("-config", "-task", "-outputPath"):
        p.add_argument(name, required=True, help=f"as e2e_trainer.py {name}")
    p.add_argument("-dataPath", default=None, help="as e2e_trainer.py -dataPath (a task that reads no files needs none)")
    p.add_argument("-run_name", default=None,
                   help="run folder name (default: <config name>_<task>_<date-time>, fixed at submission)")
    return p


class TrainerJob:
    """The submitted callable: one e2e_trainer run per task; requeues resume from ``latest.pt``.

    ``argv`` are e2e_trainer arguments with absolute paths and a fixed ``-run_name``; ``run_dir``
    is ``OUT/<run name>`` (on a filesystem shared by the nodes when rank 0's node may change
    between attempts); ``attempt`` counts requeues (0: the first start).
    """

    def __init__(self, argv: list[str], run_dir: Path, attempt: int = 0):
        self.argv, self.run_dir, self.attempt = list(argv), Path(run_dir), attempt

    def __call__(self) -> str:
        """Run this task's rank; returns the run folder.

        Raises:
            RuntimeError: e2e_trainer exited with a non-zero status on this rank.
        """
        import submitit

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        import e2e_trainer

        code = e2e_trainer.main(self.argv + self._resume_args(env.rank))
        if code != 0:
            raise RuntimeError(f"e2e_trainer exited with status {code} on rank {env.rank} (see this task's log)")
        return str(self.run_dir)

    def _resume_args(self, rank: int) -> list[str]:
        """``-resume`` when ``latest.pt`` exists; on a requeue (by submitit or by SLURM itself)
        without one, rank 0 drops the interrupted attempt's metrics.jsonl so the run starts over
        instead of refusing the folder."""
        folder = RunFolder(self.run_dir)
        latest = folder.latest
        if latest.is_file():
            print(f"pfedsim submit: attempt {self.attempt}: resuming from {latest}", flush=True)
            return ["-resume", str(latest)]
        requeued = self.attempt > 0 or int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0  # or SLURM requeued it
        if requeued and rank == 0:
            folder.metrics.unlink(missing_ok=True)
        print(f"pfedsim submit: attempt {self.attempt}: starting from round 1", flush=True)
        return []

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption / time-out (rank 0 only, in its signal handler, before
        this attempt exits): the same run, to be resumed. The server already writes ``latest.pt``
        every ``ckpt_freq`` rounds, so nothing is saved here. Nothing is torn down here either:
        submitit then raises ``SystemExit``, and the trainer's teardown (``Transport.close``)
        destroys the process group without waiting for workers still training (their next
        collective then fails and they exit too)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainerJob(self.argv, self.run_dir, self.attempt + 1))


def _absolute(path: str) -> str:
    return str(Path(path).resolve())


def trainer_argv(args, extra: list[str]) -> list[str]:
    """e2e_trainer arguments for every task: absolute paths (jobs may start elsewhere), a fixed
    run name (so a requeue finds the run), ``-backend nccl`` with GPUs unless given.

    Raises:
        UserError: ``-resume`` given (submit.py resumes by itself), or arguments e2e_trainer rejects.
    """
    if "-resume" in extra:
        raise UserError("submit.py resumes from OUT/<run_name>/checkpoints/latest.pt by itself; drop -resume "
                        "and pass the run's -run_name")
    task = args.task if (REPO / "experiments" / args.task).is_dir() else _absolute(args.task)
    name = args.run_name or RunFolder.default_name(args.config, args.task)
    data = [] if args.dataPath is None else ["-dataPath", _absolute(args.dataPath)]
    argv = ["-config", _absolute(args.config), "-task", task, *data,
            "-outputPath", _absolute(args.outputPath), "-run_name", name] + extra
    if args.gpus > 0 and "-backend" not in extra:
        argv += ["-backend", "nccl"]
    return argv


def _check_trainer_args(argv: list[str]) -> None:
    """Fail at submission, not after the queue wait, on a bad config, task, model or override."""
    import e2e_trainer
    from core.config import load_config
    from core.task import load_task

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            parsed = e2e_trainer.build_parser().parse_args(argv)
    except SystemExit:
        reason = said.getvalue().strip().removeprefix("pfedsim: error: ")
        raise UserError(f"trainer arguments: {reason}") from None
    cfg = load_config(parsed.config, parsed.overrides, parsed.seed)
    load_task(parsed.task).model_class(cfg.model)


def make_executor(args, log_dir: Path):
    """A submitit executor for ``args`` writing its logs to ``log_dir``.

    Raises:
        UserError: submitit missing, no SLURM on this machine, or a local executor asked for several nodes.
    """
    try:
        import submitit
    except ImportError:
        raise UserError("submit.py needs submitit; pip install -e \".[slurm]\"") from None
    if args.executor == "local" and args.nodes != 1:
        raise UserError(f"--executor local runs on this machine only; use --nodes 1 (got {args.nodes})")
    tasks = args.tasks_per_node or max(args.gpus, 1)
    try:
        executor = submitit.AutoExecutor(folder=log_dir, cluster=args.executor,
                                         slurm_max_num_timeout=args.max_timeouts, local_max_num_timeout=args.max_timeouts)
    except RuntimeError as exc:  # submitit finds no SLURM here (no srun)
        raise UserError(f"--executor {args.executor}: {str(exc).splitlines()[0]} Run submit.py on the cluster's "
                        f"login node, or pass --executor local") from None
    executor.update_parameters(name="pfedsim", nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus,
                               cpus_per_task=args.cpus_per_task, timeout_min=args.time)
    if args.executor == "slurm":
        executor.update_parameters(slurm_partition=args.partition, slurm_signal_delay_s=120)
    return executor


def submit(argv: list[str] | None = None):
    """Parse ``argv``, check the trainer arguments, submit; returns (submitit job, parsed options).

    Raises:
        UserError: any mistake found before submission.
    """
    args, extra = build_parser().parse_known_args(argv)
    if args.executor == "slurm" and not args.partition:
        raise UserError("--partition is required with --executor slurm (sinfo lists them)")
    targv = trainer_argv(args, extra)
    _check_trainer_args(targv)
    folder = RunFolder(Path(targv[targv.index("-outputPath") + 1]) / targv[targv.index("-run_name") + 1])
    check_writable(folder.submitit, f"-outputPath {targv[targv.index('-outputPath') + 1]}")
    executor = make_executor(args, folder.submitit)
    job = executor.submit(TrainerJob(targv, folder.path))
    print(f"pfedsim submit: job {job.job_id} -> {folder.path} (logs: {folder.submitit})", flush=True)
    return job, args


def main(argv: list[str] | None = None) -> int:
    try:
        job, args = submit(argv)
    except UserError as exc:
        print(f"pfedsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not args.wait:
        return 0
    try:
        print(f"pfedsim submit: finished, results in {job.results()[0]}")  # one result per task
    except Exception as exc:  # submitit re-raises the task's failure with its log path
        print(f"pfedsim: error: job {job.job_id} failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
