"""Run the baseline configs of this folder (or a list of them) x seeds and write one comparison table.

    python experiments/cv/baselines/run_baselines.py -dataPath ../shared/data/cifar10 -outputPath runs \\
        --seeds 3 [--configs niid_fedavg_iid.yaml ...] [--jobs 2] [--nproc 2] [--set server_config.max_iteration=5]
        [--report-only]

Every config is a sweep (``sweep.py``: one run per seed, finished runs skipped, interrupted ones
resumed) in OUT/<name>/<config stem>/. Then OUT/<name>/baselines.md holds one row per config: the
published figure named by the config's ``# published: <global|personalized> <value>`` comment, and
ours as mean ± sample std over seeds of the final and best global test accuracy and of the final
personalized accuracy (percent), with our minus published, and each seed's final value in the published
figure's metric; OUT/<name>/plots/accuracy.png draws every
config's mean curve over seeds. ``--report-only`` starts nothing and tabulates the finished seeds.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parents[2]) not in sys.path:  # run as a script from anywhere: the repository's modules
    sys.path.insert(0, str(HERE.parents[2]))
PUBLISHED = re.compile(r"^#\s*published:\s*(global|personalized)\s+([0-9.]+)\s*(.*)$", re.MULTILINE)


def build_parser() -> argparse.ArgumentParser:
    from sweep import add_launch_args
    from utils.cli import OneLineParser
    p = OneLineParser(prog="run_baselines.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-dataPath", required=True, help="folder holding cifar-10-batches-py")
    p.add_argument("-outputPath", required=True, help="results go to OUT/<name>/")
    p.add_argument("-name", default="baselines", help="folder under OUT (default baselines)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="config files (default: every *.yaml beside this script, sorted)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per config: its seed and the next ones (default 3)")
    p.add_argument("--jobs", type=int, default=1, help="runs of one config at a time (separate processes)")
    add_launch_args(p)
    p.add_argument("--report-only", action="store_true",
                   help="start no runs: tabulate the seeds already finished (the seeds column counts them)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a value of every config (e.g. a shorter budget), repeatable")
    return p


def published(config: Path) -> tuple[str, float, str] | None:
    """(metric, value in percent, source) from the config's ``# published:`` comment, or None."""
    match = PUBLISHED.search(config.read_text())
    return (match.group(1), float(match.group(2)), match.group(3).strip("() ")) if match else None


def config_paths(names: list[str] | None) -> list[Path]:
    """The configs to run: given paths (or names in this folder), else every YAML here."""
    if not names:
        return sorted(HERE.glob("*.yaml"))
    return [Path(n) if Path(n).is_file() else HERE / n for n in names]


def _pct(stat) -> str:
    """Percent ``mean ± std`` (one decimal) of a (mean, std, n) triple; the mean alone for one seed."""
    from utils.sweep import stat_cell
    return stat_cell(stat, 1)


def per_seed(config: Path, row: dict) -> str:
    """``seed: value`` (percent, two decimals) of each finished seed's final accuracy, in the metric the
    config's published figure names (global without one); ``-`` when no seed has finished."""
    from utils.compare import run_scores

    pub = published(config)
    key = f"final_{pub[0] if pub else 'global'}"
    values = [(name.split("seed=")[-1], run_scores(h)[key]) for name, h in zip(row["runs"], row["histories"])]
    return ", ".join(f"{seed}: {100 * v:.2f}" for seed, v in values if v is not None) or "-"


def table_row(config: Path, row: dict) -> str:
    """One Markdown row: config, published, ours (final/best global, final personalized), difference,
    seed count, and each seed's final value."""
    pub = published(config)
    ours = {"global": row["final_global"], "personalized": row["final_personalized"]}
    diff = "-"
    if pub and ours[pub[0]] is not None:
        diff = f"{100 * ours[pub[0]][0] - pub[1]:+.1f}"
    pub_text = f"{pub[0]} {pub[1]:g}" if pub else "-"
    cells = [config.stem, pub_text, _pct(row["final_global"]), _pct(row["best_global"]),
             _pct(row["final_personalized"]), diff, str(len(row["runs"])), per_seed(config, row)]
    return "| " + " | ".join(cells) + " |"


def write_report(out: Path, results: list[tuple[Path, dict]], header: str) -> str:
    """baselines.md and plots/accuracy.png from (config, aggregated sweep row) pairs; returns the table."""
    from utils.compare import compare_plot
    from utils.sweep import mean_history

    lines = ["| config | published | final global | best global | final personalized | ours - published | seeds "
             "| final by seed |", "|---|---|---|---|---|---|---|---|"] + [table_row(c, r) for c, r in results]
    table = "\n".join(lines)
    (out / "baselines.md").write_text(f"# Baselines\n\n{header}\n\nAccuracy in percent, mean ± sample std over "
                                      f"seeds; final: last round, best: best evaluation.\n\n{table}\n")
    curves = [{"name": c.stem, "history": mean_history(r["histories"])} for c, r in results if r["histories"]]
    if curves:
        compare_plot(curves, out / "plots" / "accuracy.png")
    return table


def run(args) -> tuple[list[tuple[Path, dict]], list[str]]:
    """Sweep every config; returns (config, aggregated row) pairs and the configs with failed runs."""
    import sweep
    from core.errors import UserError
    from utils.sweep import aggregate, plan

    out = Path(args.outputPath) / args.name
    results, failed = [], []
    for config in config_paths(args.configs):
        argv = ["-config", str(config), "-task", "cv", "-dataPath", args.dataPath, "-outputPath", str(out),
                "-name", config.stem, "--seeds", str(args.seeds), "--jobs", str(args.jobs),
                "--nproc", str(args.nproc), "--backend", args.backend]
        for assignment in args.overrides:
            argv += ["--set", assignment]
        if not args.report_only and sweep.main(argv) != 0:
            failed.append(config.stem)
        try:
            results.append((config, aggregate(out / config.stem, plan(str(config), args.overrides, [], args.seeds))[0]))
        except UserError:  # sweep.main has printed it (a folder of another config, a bad override)
            continue
    return results, failed


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    missing = [str(p) for p in config_paths(args.configs) if not p.is_file()]
    if missing:
        print(f"pfedsim: error: --configs: {', '.join(missing)} not found; name files in {HERE} or give paths",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    results, failed = run(args)
    out = Path(args.outputPath) / args.name
    seeds = f"the finished runs of {args.seeds} seed(s)" if args.report_only else f"{args.seeds} seed(s)"
    header = (f"Generated by run_baselines.py on {time.strftime('%Y-%m-%d')}, {seeds}, "
              f"overrides: {args.overrides or 'none'}, {time.perf_counter() - started:.0f} s wall.")
    print(write_report(out, results, header))
    print(f"Written to {out}: baselines.md, plots/accuracy.png, one sweep folder per config")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
