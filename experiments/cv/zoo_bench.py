"""Model zoo benchmark: accuracy vs number of parameters, federated and centralized, on CIFAR-10.

For each model of ``--models`` it runs e2e_trainer twice in this process, from one base config:

- federated: the config as given (its partition, cohort, personalization), ``--rounds`` rounds;
- centralized reference: one client holding all training data (``data_config.num_clients=1``,
  IID, cohort 1, no personalization) for ``--central-rounds`` rounds. A centralized round is
  ``client_config.local_epochs`` epochs over the 50,000 training images; by default the rounds
  are as few as give at least as many sample passes as the federated run (usually 1 on a small
  budget); 0 skips the reference.

Then it reads each run's ``metrics.jsonl`` and writes, in ``-outputPath``, ``zoo.png`` (final
accuracy vs parameters, log-scale x, one point per model: global, personalized and centralized
series) and ``zoo.md`` (the same as a Markdown table). Run from the repository root:

    python -m experiments.cv.zoo_bench -dataPath ../shared/data/cifar10 -outputPath runs/zoo \\
        -config experiments/cv/config_zoo_cpu.yaml --models LeNet5 SmallCNN --rounds 10
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import e2e_trainer
from core.config import cohort_range, load_config
from core.errors import UserError
from core.task import load_task
from utils.cli import OneLineParser
from utils.compare import load_run, run_scores

CENTRAL = ("data_config.num_clients=1", "data_config.partition=iid", "server_config.num_clients_per_iteration=1",
           "personalization.method=none", "personalization.local_layers=[]")
"""Overrides that turn any base config into the centralized reference (one client, all data)."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m experiments.cv.zoo_bench", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-dataPath", required=True, help="folder holding cifar-10-batches-py")
    p.add_argument("-outputPath", required=True, help="folder for the runs (<model>_fed, <model>_central), zoo.png, zoo.md")
    p.add_argument("-config", default="experiments/cv/config_zoo_cpu.yaml", help="base experiment YAML")
    p.add_argument("--models", nargs="+", default=["LeNet5", "SmallCNN"], help="model_type names of the cv task")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the config's max_iteration)")
    p.add_argument("--central-rounds", type=int, default=None,
                   help="centralized rounds (default: fewest matching the federated sample passes; 0: skip)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override for every run, as e2e_trainer's --set (repeatable)")
    p.add_argument("--central-set", dest="central_overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="extra override for the centralized runs only, e.g. client_config.batch_size=128")
    return p


def matched_central_rounds(cfg, rounds: int) -> int:
    """Fewest centralized rounds (each over all training samples) whose sample passes reach those of
    ``rounds`` federated rounds of mean cohort size (a share cohort / num_clients of the data each)."""
    low, high = cohort_range(cfg.server_config.num_clients_per_iteration)
    return max(1, math.ceil(rounds * (low + high) / 2 / cfg.data_config.num_clients))


def parameter_counts(task, cfg, models: list[str]) -> dict:
    """{model name: trainable parameters}; builds every model first, so a bad name fails before training.

    Raises:
        UserError: an unknown model name (the task's one-line message).
    """
    return {name: task.build_model(cfg.model.model_copy(update={"model_type": name})).num_parameters()
            for name in models}


def train(args, run_name: str, overrides: list[str]) -> Path:
    """One e2e_trainer run in this process; returns its run folder.

    Raises:
        UserError: the run failed (its own error line was printed above).
    """
    argv = ["-dataPath", args.dataPath, "-outputPath", args.outputPath, "-config", args.config, "-task", "cv",
            "-run_name", run_name] + [arg for item in overrides for arg in ("--set", item)]
    print(f"zoo_bench: training {run_name}", flush=True)
    if e2e_trainer.main(argv) != 0:
        raise UserError(f"zoo_bench: run {run_name} failed (see its error above); its folder is "
                        f"{Path(args.outputPath) / run_name}")
    return Path(args.outputPath) / run_name


def final_results(run_dir: Path) -> dict:
    """Last evaluation of a run: global test accuracy, personalized weighted mean (None without
    personalization) as fractions, and the seconds of its round loop up to that evaluation."""
    history = load_run(run_dir)["history"]
    scores = run_scores(history)
    return {"global": scores["final_global"], "personalized": scores["final_personalized"],
            "seconds": history[-1]["elapsed_s"], "round": history[-1]["round"]}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def zoo_table(rows: list[dict]) -> str:
    """Markdown table, one row per model: parameters, accuracies (percent), seconds."""
    lines = ["| model | parameters | global test acc (%) | personalized acc (%) | centralized acc (%) "
             "| federated wall s | centralized wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        fed, central = row["federated"], row.get("centralized") or {}
        central_s = f"{central['seconds']:.0f}" if central else "-"
        lines.append(f"| {row['model']} | {row['params']:,} | {_pct(fed['global'])} | {_pct(fed['personalized'])} "
                     f"| {_pct(central.get('global'))} | {fed['seconds']:.0f} | {central_s} |")
    return "\n".join(lines)


def zoo_plot(rows: list[dict], path: Path, title: str) -> None:
    """PNG: final accuracy (%) vs parameters (log x); global, personalized and centralized series."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("global model (federated)", "o", lambda r: r["federated"]["global"]),
              ("personalized (federated)", "s", lambda r: r["federated"]["personalized"]),
              ("centralized reference", "^", lambda r: (r.get("centralized") or {}).get("global"))]
    for label, marker, value in series:
        points = [(r["params"], 100 * value(r)) for r in rows if value(r) is not None]
        if points:
            ax.plot(*zip(*sorted(points)), marker=marker, linestyle=":", label=label)
    for row in rows:
        ax.annotate(row["model"], (row["params"], 100 * row["federated"]["global"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("final accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_zoo(args) -> list[dict]:
    """Train every model federated (and centralized unless 0 rounds); one result row per model."""
    cfg = load_config(args.config, args.overrides)
    rounds = args.rounds or cfg.server_config.max_iteration
    central_rounds = matched_central_rounds(cfg, rounds) if args.central_rounds is None else args.central_rounds
    params = parameter_counts(load_task("cv"), cfg, args.models)
    rows = []
    for name in args.models:
        common = args.overrides + [f"model_config.model_type={name}"]
        row = {"model": name, "params": params[name],
               "federated": final_results(train(args, f"{name}_fed", common + [f"server_config.max_iteration={rounds}"]))}
        if central_rounds > 0:
            central = [*common, *CENTRAL, *args.central_overrides, f"server_config.max_iteration={central_rounds}"]
            row["centralized"] = final_results(train(args, f"{name}_central", central))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    """Run the benchmark and write zoo.png and zoo.md; 0 on success, 2 on a user error."""
    args = build_parser().parse_args(argv)
    try:
        rows = run_zoo(args)
    except UserError as exc:
        print(f"pfedsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    out = Path(args.outputPath)
    title = f"{Path(args.config).name}, federated rounds: {rows[0]['federated']['round']}"
    zoo_plot(rows, out / "zoo.png", title)
    (out / "zoo.md").write_text(zoo_table(rows) + "\n")
    print(f"\n{zoo_table(rows)}\n\nWritten {out / 'zoo.png'} and {out / 'zoo.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
