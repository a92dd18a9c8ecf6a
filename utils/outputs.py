"""The observers of a command-line run (see core/observers.py): metrics.jsonl with TensorBoard and
W&B, the console (progress bar, a line per evaluation, the final table) and the run folder's
summary.md, plots and clients.csv."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from tqdm import tqdm

from core.files import disk_guard
from core.observers import RunObserver, RunOutcome, RunStart
from utils.metrics_writer import MetricsWriter
from utils.report import (best_line, format_line, plot_accuracy, plot_client_histogram, results_table,
                          write_client_table, write_summary)


class Console(RunObserver):
    """A tqdm bar over the rounds (only on a terminal), one line per evaluation
    (:func:`utils.report.format_line`), and the final table with what chose best.pt."""

    def __init__(self):
        self.bar = None

    def started(self, history, start_round, rounds):
        self.bar = tqdm(total=rounds, initial=start_round - 1, desc="rounds", unit="round", dynamic_ncols=True,
                        mininterval=2.0, disable=None)  # no bar when stderr is not a terminal

    def round_done(self, round_idx, train_loss):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{train_loss:.3f}")

    def evaluated(self, record, rounds):
        tqdm.write(format_line(record, rounds))

    def finished(self, outcome: RunOutcome):
        self.close()
        if outcome.stopped or not outcome.history:
            return
        name, last = outcome.run_dir.name, outcome.history[-1]
        print(f"\nFinal results of {name} (accuracy %, round {last['round']}, {outcome.wall_s:.0f} s):")
        print(results_table(last))
        print(best_line(outcome.history))
        print(f"Written to {outcome.run_dir}: metrics.jsonl, summary.md, clients.csv, plots/, checkpoints/, "
              f"TensorBoard events")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunFiles(RunObserver):
    """summary.md, plots/accuracy.png, clients.csv and plots/clients_hist.png, written when the run
    ends (a diverged run's summary.md says where and why it stopped).

    Raises (from :meth:`finished`):
        DiskFull: no room for them.
    """

    def finished(self, outcome: RunOutcome):
        if not outcome.history:
            return
        run_dir, name = outcome.run_dir, outcome.run_dir.name
        config_text = yaml.safe_dump(outcome.config, sort_keys=False)
        with disk_guard(run_dir / "summary.md", len(config_text) + 10_000 * len(outcome.history)):
            write_summary(run_dir / "summary.md", name, outcome.history, config_text, outcome.wall_s, outcome.stopped,
                          recorded_task(run_dir), outcome.matrix, outcome.trained)
            plot_accuracy(run_dir / "plots" / "accuracy.png", outcome.history, name)
            if outcome.matrix is not None:
                write_client_table(run_dir / "clients.csv", outcome.matrix, outcome.trained)
                plot_client_histogram(run_dir / "plots" / "clients_hist.png", outcome.matrix, outcome.trained, name)


def recorded_task(run_dir: Path) -> str | None:
    """The task named in the run's run.json (written when the run started), or None without one."""
    path = run_dir / "run.json"
    try:
        return json.loads(path.read_text()).get("task") if path.is_file() else None
    except (OSError, ValueError):
        return None


def run_outputs(run_dir: Path, cfg) -> list[RunObserver]:
    """The observers of a run started from the command line (rank 0 only), in the order they hear
    each event: metrics first, so a record is on disk before it is printed, and the run folder's
    files before the final table.

    Raises:
        UserError: W&B switched on but the wandb package is missing.
    """
    return [MetricsWriter(run_dir, cfg.logging_config, cfg.to_dict()), RunFiles(), Console()]


class OpenedLater(RunObserver):
    """The observers ``build()`` returns, built when the run opens: after the observers before this
    one heard :meth:`opening` (the run folder's lock and checks), so a refused run writes none of their
    files (TensorBoard's, W&B's). Every later event goes to them in order.

    Raises (from :meth:`opening`):
        UserError: from ``build()`` (W&B switched on but missing, or failing to start).
    """

    def __init__(self, build):
        self.build = build
        self.parts: list[RunObserver] = []

    def _tell(self, event: str, *args) -> None:
        for part in self.parts:
            getattr(part, event)(*args)

    def opening(self, start: RunStart):
        self.parts = list(self.build())
        self._tell("opening", start)

    def started(self, history, start_round, rounds):
        self._tell("started", history, start_round, rounds)

    def round_done(self, round_idx, train_loss):
        self._tell("round_done", round_idx, train_loss)

    def evaluated(self, record, rounds):
        self._tell("evaluated", record, rounds)

    def finished(self, outcome: RunOutcome):
        self._tell("finished", outcome)

    def close(self):
        self._tell("close")
