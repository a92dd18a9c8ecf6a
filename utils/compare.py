"""Lay several finished runs side by side: one Markdown table and one plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from core.errors import UserError
from utils.report import best_record


def load_run(run_dir: Path) -> dict:
    """Name, resolved config and evaluation records of a run folder.

    Raises:
        UserError: when the folder has no metrics.jsonl, or one with no evaluation or a line that is
            not JSON.
    """
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir} is not a finished run (no metrics.jsonl); pass run folders under -outputPath")
    history = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{metrics} line {number} is not JSON (cut short?); resume the run to rewrite it "
                            f"from its checkpoint, or leave the run out") from None
    if not history:
        raise UserError(f"{run_dir} has no evaluation yet (metrics.jsonl is empty); compare it after its first "
                        f"evaluation round")
    config = yaml.safe_load((run_dir / "config.resolved.yaml").read_text()) if (run_dir / "config.resolved.yaml").is_file() else {}
    return {"name": run_dir.name, "config": config, "history": history}


def run_scores(history: list[dict]) -> dict:
    """Test accuracies of one run at its last evaluation and at the evaluation that chose best.pt,
    as fractions.

    Keys ``final_global``, ``best_global`` (global model, full test set), ``final_personalized``,
    ``best_personalized`` (sample-weighted mean over the personalized clients; None when the run has
    no personalized evaluation), ``best_round`` and ``best_metric`` (what chose it: a validation
    metric, or ``global_test_acc`` when the run had no validation split, in which case the best
    figures are chosen on the test set itself). Runs recorded before best was chosen this way carry
    no ``best``; for them the best round is the highest global test accuracy.
    """
    def personal(r):
        return r["personalized"]["weighted_mean"] if r.get("personalized", {}).get("clients") else None
    best = best_record(history) or max(history, key=lambda r: r["global_test_acc"])
    chosen = history[-1].get("best") or {"metric": "global_test_acc"}
    return {"final_global": history[-1]["global_test_acc"], "best_global": best["global_test_acc"],
            "final_personalized": personal(history[-1]), "best_personalized": personal(best),
            "best_round": best["round"], "best_metric": chosen["metric"]}


def _pct(stats: dict | None, key: str) -> str:
    value = (stats or {}).get(key)
    return "-" if value is None else f"{100 * value:.2f}"


def privacy_cell(record: dict) -> str:
    """The epsilon a run had spent at an evaluation ``record``, as ``epsilon (delta)``: ``no DP``
    without a ``privacy`` entry, ``inf`` for clipping without noise (epsilon null)."""
    dp = record.get("privacy")
    if not dp:
        return "no DP"
    return epsilon_text(math.inf if dp.get("epsilon") is None else dp["epsilon"], dp["delta"])


def epsilon_text(epsilon: float, delta: float) -> str:
    """``epsilon (delta d)``: epsilon to 2 decimals, ``inf`` for clipping without noise."""
    return f"{'inf' if math.isinf(epsilon) else f'{epsilon:.2f}'} (delta {delta:g})"


def compare_table(runs: list[dict]) -> str:
    """Markdown: per run, method, final accuracies (percent) of its last evaluation, and the epsilon
    spent by then (central DP; :func:`privacy_cell`)."""
    lines = ["| run | strategy | personalization | round | global test | global on clients (mean ± std, p10) "
             "| personalized (mean ± std, p10) | personalized clients | epsilon (delta) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        last, cfg = run["history"][-1], run["config"]
        g, p = last["global_local"], last.get("personalized")
        pers = f"{_pct(p, 'weighted_mean')} ({_pct(p, 'mean')} ± {_pct(p, 'std')}, {_pct(p, 'p10')})" if p else "-"
        lines.append(f"| {run['name']} | {cfg.get('strategy', '?')} | {cfg.get('personalization', {}).get('method', '?')} "
                     f"| {last['round']} | {_pct(last, 'global_test_acc')} | {_pct(g, 'weighted_mean')} "
                     f"({_pct(g, 'mean')} ± {_pct(g, 'std')}, {_pct(g, 'p10')}) | {pers} | "
                     f"{(p or {}).get('clients', '-')} | {privacy_cell(last)} |")
    return "\n".join(lines)


def compare_figure(runs: list[dict], title: str):
    """Figure of global test accuracy (solid, circles) and personalized accuracy (dashed, triangles)
    per round, one colour per run; markers on every point, whole-number round ticks.

    A run's records may carry ``global_test_std`` / ``personalized_std`` and ``seeds`` (from
    :func:`utils.sweep.mean_history`): its lines are then the mean over seeds, drawn with a band of
    ± that sample std (error bars at a single evaluation), and the legend says so.
    """
    import numpy as np

    from utils.report import integer_rounds, new_figure

    fig, ax = new_figure(8, 5)
    for run in runs:
        history = run["history"]
        rounds = np.array([r["round"] for r in history])
        seeds = max((r.get("seeds", 1) for r in history), default=1)
        what = f" (mean of {seeds} seeds, band ± std)" if seeds > 1 else ""
        series = [("global test", "o-", [r.get("global_test_acc") for r in history],
                   [r.get("global_test_std") for r in history])]
        if any(r.get("personalized", {}).get("clients") for r in history):
            series.append(("personalized", "^--", [r.get("personalized", {}).get("weighted_mean") for r in history],
                           [r.get("personalized_std") for r in history]))
        color = None
        for words, style, values, stds in series:
            mean = 100 * np.array([np.nan if v is None else v for v in values], dtype=float)
            line, = ax.plot(rounds, mean, style, color=color, label=f"{run['name']} {words}{what}")
            color = line.get_color()
            if seeds > 1:
                std = 100 * np.array([np.nan if v is None else v for v in stds], dtype=float)
                if len(rounds) > 1:
                    ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
                else:
                    ax.errorbar(rounds, mean, yerr=std, fmt="none", ecolor=color, capsize=4)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def compare_plot(runs: list[dict], path: Path, title: str | None = None) -> None:
    """PNG of :func:`compare_figure`; ``title`` defaults to what the lines measure."""
    from utils.report import save_figure

    title = title or ("Test accuracy per round\nsolid: global model, full test set; dashed: personalized models, "
                      "trained clients' test splits (sample-weighted)")
    save_figure(compare_figure(runs, title), path)
