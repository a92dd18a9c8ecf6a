"""Lay several finished runs side by side: one Markdown table and one plot."""
from __future__ import annotations

import json
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


def compare_table(runs: list[dict]) -> str:
    """Markdown: per run, method and final accuracies (percent) of its last evaluation."""
    lines = ["| run | strategy | personalization | round | global test | global on clients (mean ± std, p10) "
             "| personalized (mean ± std, p10) | personalized clients |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        last, cfg = run["history"][-1], run["config"]
        g, p = last["global_local"], last.get("personalized")
        pers = f"{_pct(p, 'weighted_mean')} ({_pct(p, 'mean')} ± {_pct(p, 'std')}, {_pct(p, 'p10')})" if p else "-"
        lines.append(f"| {run['name']} | {cfg.get('strategy', '?')} | {cfg.get('personalization', {}).get('method', '?')} "
                     f"| {last['round']} | {_pct(last, 'global_test_acc')} | {_pct(g, 'weighted_mean')} "
                     f"({_pct(g, 'mean')} ± {_pct(g, 'std')}, {_pct(g, 'p10')}) | {pers} | "
                     f"{(p or {}).get('clients', '-')} |")
    return "\n".join(lines)


def compare_plot(runs: list[dict], path: Path) -> None:
    """PNG: global test accuracy (solid) and personalized accuracy (dashed) per round, per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        rounds = [r["round"] for r in run["history"]]
        line, = ax.plot(rounds, [100 * r["global_test_acc"] for r in run["history"]], "-", label=f"{run['name']} global")
        if any(r.get("personalized", {}).get("clients") for r in run["history"]):
            ax.plot(rounds, [100 * r.get("personalized", {}).get("weighted_mean", float("nan")) for r in run["history"]],
                    "--", color=line.get_color(), label=f"{run['name']} personalized")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
