"""Run a grid of pfedsim experiments x seeds, skip finished runs, resume interrupted ones, compare.

    python sweep.py -config experiments/cv/config_cpu.yaml -task cv -dataPath DATA -outputPath runs \\
        --grid "client_config.optimizer_config.lr=0.01,0.05" --grid "data_config.alpha=0.1,1.0" \\
        --seeds 3 --jobs 2

Every grid point x seed is one e2e_trainer.py run (a subprocess, ``--jobs`` at a time) in
OUT/<sweep name>/<run name>/, with run names from the grid point and seed
(``lr=0.01_alpha=0.1_seed=0``). ``--grid personalization.method=none,fedper,finetune`` compares
methods: each keeps the config's personalization.local_layers if it reads them, [] if it chooses
its own (utils.sweep.method_layers). Writes sweep.md, sweep.csv (mean and std over seeds of final
and best global and personalized accuracy per grid point), plots/accuracy.png and logs/<run>.log
into the sweep folder; ``tensorboard --logdir OUT/<sweep name>`` shows every run.

When the runs report privacy (``privacy.mechanism: gaussian``), sweep.md and sweep.csv also give the
epsilon spent by the end of each grid point's runs and its delta, and plots/accuracy_vs_epsilon.png
draws final global and personalized accuracy against that epsilon (log scale, no noise at the
right edge as ``inf``), one line per value of the grid axes other than the noise
(``privacy.noise_multiplier``, ``privacy.target_epsilon``), e.g.

    python sweep.py ... --set privacy.mechanism=gaussian --set strategy_config.client_weighting=uniform \\
        --grid "privacy.noise_multiplier=0,0.5,1.0" --grid "personalization.method=none,fedper"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import UserError
from core.task import load_task
from utils.cli import OneLineParser, make_folder
from utils.sweep import (EPSILON_PLOT, aggregate, clear_incomplete, epsilon_series, launch, parse_axis, plan,
                         run_status, trainer_command, with_existing_names, write_report)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sweep.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-config", required=True, help="experiment YAML shared by every run")
    p.add_argument("-task", required=True, help="task folder name under experiments/ or a path to one")
    p.add_argument("-dataPath", help="folder holding the task's data (a task that reads no files needs none)")
    p.add_argument("-outputPath", required=True, help="the sweep folder is OUT/<sweep name>/")
    p.add_argument("-name", default=None, help="sweep name (default <config name>_<task>_sweep)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY.PATH=V1,V2",
                   help="config key and its values (YAML each), repeatable; runs are the product of all grids")
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid point: the config's seed and the next ones")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes)")
    add_launch_args(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value of every run, repeatable")
    return p


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """``--nproc`` and ``--backend``: how many processes each run has (torch.distributed.run when > 1)."""
    p.add_argument("--nproc", type=int, default=1,
                   help="processes per run (default 1); more launch each run under torch.distributed.run "
                        "--standalone, rank 0 the server that also trains a share of each cohort")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"],
                   help="torch.distributed backend of runs with --nproc > 1 (default gloo; nccl for one GPU per process)")


def prepare(args):
    """Validate everything before any run starts; returns (sweep folder, axes, runs, status per run name).

    Raises:
        UserError: unknown task, bad grid syntax, unknown key or invalid value in any grid point,
            or a sweep folder holding runs of another config.
    """
    task = load_task(args.task)
    if args.jobs < 1 or args.nproc < 1:
        raise UserError(f"--jobs {args.jobs}, --nproc {args.nproc}: expected at least 1 each")
    axes = [parse_axis(text) for text in args.grid]
    sweep_dir = Path(args.outputPath) / (args.name or f"{Path(args.config).stem}_{Path(args.task).name}_sweep")
    runs = with_existing_names(sweep_dir, plan(args.config, args.overrides, axes, args.seeds, task))
    status = {run.name: run_status(sweep_dir / run.name, run.config) for run in runs}
    make_folder(sweep_dir, f"-outputPath {args.outputPath}")
    return sweep_dir, axes, runs, status


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep_dir, axes, runs, status = prepare(args)
    except UserError as exc:
        print(f"pfedsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    count = {s: sum(v == s for v in status.values()) for s in ("done", "resume", "new")}
    print(f"sweep {sweep_dir}: {len(runs)} runs ({len(runs) // args.seeds} grid points x {args.seeds} seeds); "
          f"{count['done']} finished (skipped), {count['resume']} to resume, {count['new']} to start", flush=True)
    jobs = []
    for run in runs:
        if status[run.name] == "new":
            clear_incomplete(sweep_dir / run.name)
        if status[run.name] != "done":
            jobs.append((run, trainer_command(run, sweep_dir, args, resume=status[run.name] == "resume")))
    failed = launch(jobs, sweep_dir, args.jobs, args.nproc) if jobs else []
    rows = aggregate(sweep_dir, runs)
    table = write_report(sweep_dir, rows, axes)
    print(table)
    plots = "plots/accuracy.png" + (f", {EPSILON_PLOT.as_posix()}" if epsilon_series(rows, axes) else "")
    print(f"Written to {sweep_dir}: sweep.md, sweep.csv, {plots}, logs/; tensorboard --logdir {sweep_dir}")
    if failed:
        print(f"pfedsim: error: {len(failed)} run(s) failed: {', '.join(failed)}; see {sweep_dir / 'logs'}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
