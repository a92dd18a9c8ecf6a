"""Grid sweeps: every grid point x seed is one e2e_trainer.py run (a subprocess) under one sweep folder.

Run names are a pure function of the grid point and the seed (``lr=0.01_alpha=0.1_seed=0``), so a
second invocation finds its runs again: finished ones are skipped, interrupted ones resumed.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from core.config import config_difference, load_config, with_defaults
from core.errors import UserError
from core.checkpoint import load_checkpoint
from utils.compare import compare_plot, epsilon_text, load_run, run_scores
from utils.run_folder import RunFolder

SCORES = ("final_global", "best_global", "final_personalized", "best_personalized")
IGNORED_KEYS = frozenset({"server_config.max_iteration", "server_config.resume_from_checkpoint"})


@dataclass(frozen=True)
class Axis:
    """One ``--grid`` option: a dotted config key and its values as YAML texts."""

    key: str
    values: tuple[str, ...]


def parse_axis(text: str) -> Axis:
    """``key.path=v1,v2`` (values split at commas) or ``key.path=[v1, v2]`` (a YAML list, for values
    that hold commas themselves, e.g. ``server_config.num_clients_per_iteration=["5,10", 20]``).

    Raises:
        UserError: no ``=``, an empty key or value, a repeated value, or ``seed`` (use --seeds).
    """
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip() or " " in key:
        raise UserError(f"--grid {text!r}: expected key.path=v1,v2 (e.g. client_config.optimizer_config.lr=0.01,0.05)")
    if key == "seed":
        raise UserError(f"--grid {text!r}: seeds are set with --seeds N, not as a grid key")
    if rest.strip().startswith("["):
        try:
            items = yaml.safe_load(rest)
        except yaml.YAMLError:
            items = None
        if not isinstance(items, list):
            raise UserError(f"--grid {text!r}: the value list is not valid YAML, e.g. key=[a, b]")
        values = [yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip() for v in items]
    else:
        values = [v.strip() for v in rest.split(",")]
    if not values or any(not v for v in values) or len(set(values)) != len(values):
        raise UserError(f"--grid {text!r}: values must be non-empty and distinct, e.g. {key}=0.1,1.0")
    return Axis(key, tuple(values))


def _expand(key: str, text: str) -> list[tuple[str, str]]:
    """A (key, YAML value text) pair, with a mapping value (a whole section, e.g. ``personalization={method:
    fedper, local_layers: [linear]}``) opened into one pair per entry (``personalization.method``, ...)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return [(key, text)]
    if not isinstance(value, dict) or not value:
        return [(key, text)]
    return [pair for k, v in value.items()
            for pair in _expand(f"{key}.{k}", yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip())]


def _value_slug(text: str) -> str:
    """A value's text for a name: a list's items joined by ``+`` (``[hidden, linear]`` -> ``hidden+linear``,
    ``[]`` -> ``none``); any other value as written."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, list):
        return "+".join(_value_slug(yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip())
                        for v in value) or "none"
    return text


def assignment_slug(pairs) -> str:
    """``[(key, value), ...]`` -> ``leaf=value_leaf=value`` (the full key where leaf names repeat), a
    short readable folder or file name part: a mapping value names each of its entries
    (``personalization={method: fedper}`` -> ``method=fedper``), a list its items joined by ``+``
    (``local_layers=[hidden, linear]`` -> ``local_layers=hidden+linear``); characters outside
    ``[A-Za-z0-9._=+-]`` are replaced by ``-``."""
    return _join([pair for k, v in pairs for pair in _expand(k.strip(), str(v).strip())], _value_slug)


def legacy_slug(pairs) -> str:
    """The run names of sweeps made before names were made readable (values written out whole, e.g.
    ``personalization=-local_layers---linear---method--fedper-``), to find their folders again."""
    return _join([(k.strip(), str(v).strip()) for k, v in pairs], str)


def _join(pairs: list[tuple[str, str]], render) -> str:
    """``leaf=render(value)`` parts (the full key where leaf names repeat) joined by ``_``, with
    characters outside ``[A-Za-z0-9._=+-]`` replaced by ``-``."""
    leaves = [k.split(".")[-1] for k, _ in pairs]
    parts = [f"{leaf if leaves.count(leaf) == 1 else key}={render(value)}" for (key, value), leaf in zip(pairs, leaves)]
    return "_".join(re.sub(r"[^A-Za-z0-9._=+-]", "-", part) for part in parts)


@dataclass(frozen=True)
class SweepRun:
    """One run of the sweep: its grid point ((key, value text) pairs), seed and validated config, and
    ``implied``: the assignments the sweep added to the grid point ((key, value text) pairs, e.g. a
    method grid's ``personalization.local_layers=[]`` for the methods that choose their own layers)."""

    name: str
    point: tuple[tuple[str, str], ...]
    seed: int
    config: object
    implied: tuple[tuple[str, str], ...] = ()

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.point + self.implied]


def method_layers(point: tuple[tuple[str, str], ...], base) -> tuple[tuple[str, str], ...]:
    """What a grid point over ``personalization.method`` implies for ``personalization.local_layers``
    when it does not set them itself (``base``: the sweep's config after ``--set``, without the point).

    The config's local_layers are kept for a method that reads them (fedper and fedrep: the personal
    head; lgfedavg: the local body) and cleared (``[]``) for a method that chooses its own personal
    parameters (none, local, finetune, fedbn, ditto, apfl), so that one grid compares them all. A
    grid over the whole section (``personalization={method: fedper}``) replaces the section, so
    there the config's local_layers are given back to a method that reads them.

    Raises:
        UserError: the method reads local_layers and the config has none, or the config's name a head
            (fedper / fedrep) and the method wants a body (lgfedavg) or the other way round.
    """
    from core.personalization import METHODS, FedPer, LGFedAvg

    pairs = dict(pair for k, v in point for pair in _expand(k, v))
    if "personalization.method" not in pairs or "personalization.local_layers" in pairs:
        return ()
    method = yaml.safe_load(pairs["personalization.method"])
    cls = METHODS.get(method)
    if cls is None:
        return ()  # the config check names the unknown method
    layers = list(base.personalization.local_layers)
    section = any(key == "personalization" for key, _ in point)  # the section replaced: local_layers default []
    if not issubclass(cls, FedPer):
        return (("personalization.local_layers", "[]"),) if layers and not section else ()
    example = "{method: lgfedavg, local_layers: [hidden]}"
    if not layers:
        raise UserError(f"method {method} needs personalization.local_layers and the config sets none; give them "
                        f"to every run with --set personalization.method={method} --set 'personalization.local_layers=[linear]' "
                        f"(the methods that choose their own layers get [] in a method grid), or per method: "
                        f"--grid 'personalization=[{{method: {method}, local_layers: [linear]}}, {{method: none}}]'")
    base_cls = METHODS.get(base.personalization.method)
    if base_cls is not None and issubclass(base_cls, FedPer) and issubclass(base_cls, LGFedAvg) != issubclass(cls, LGFedAvg):
        meant = "local body" if issubclass(base_cls, LGFedAvg) else "personal head"
        raise UserError(f"method {method}: the config's personalization.local_layers {layers} name method "
                        f"{base.personalization.method}'s {meant}, which {method} reads the other way round; give "
                        f"each method its own: --grid 'personalization=[{{method: fedper, local_layers: [linear]}}, "
                        f"{example}]'")
    return (("personalization.local_layers", yaml.safe_dump(layers, default_flow_style=True).strip()),) if section else ()


def plan(config_path: str, sets: list[str], axes: list[Axis], seeds: int, task=None) -> list[SweepRun]:
    """Every grid point x seed, each config validated (and its model type and options against
    ``task``'s models when given); seeds are ``seed .. seed + seeds - 1`` of the config (after ``sets``).

    Raises:
        UserError: a repeated grid key, a bad seed count, or any invalid config (named by grid point).
    """
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise UserError(f"--grid: key {next(k for k in keys if keys.count(k) > 1)} is given twice; "
                        f"list all its values in one --grid")
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: expected a number of seeds >= 1")
    base = load_config(config_path, sets)
    runs = []
    for values in itertools.product(*(a.values for a in axes)):
        point = tuple(zip(keys, values))
        for seed in range(base.seed, base.seed + seeds):
            name = assignment_slug(list(point) + [("seed", seed)])
            try:
                implied = method_layers(point, base)
                cfg = load_config(config_path, list(sets) + [f"{k}={v}" for k, v in point + implied], seed)
                if task is not None:
                    task.model_class(cfg.model)
            except UserError as exc:
                raise UserError(f"grid point {assignment_slug(point) or '(none)'}: {exc}") from None
            runs.append(SweepRun(name, point, seed, cfg, implied))
    return runs


def with_existing_names(sweep_dir: Path, runs: list[SweepRun]) -> list[SweepRun]:
    """``runs``, each renamed to its :func:`legacy_slug` name when the sweep folder holds a run there
    and none under the new name: a sweep made before readable names goes on in its own folders."""
    out = []
    for run in runs:
        old = legacy_slug(list(run.point) + [("seed", run.seed)])
        if old != run.name and (sweep_dir / old).is_dir() and not (sweep_dir / run.name).exists():
            run = replace(run, name=old)
        out.append(run)
    return out


def checkpoint_round(path: Path) -> int:
    """The round stored in a checkpoint file (loaded memory-mapped: the tensors are not read)."""
    return int(load_checkpoint(path, verify=False)["round"])  # the round alone: no hash of the whole file


def run_status(run_dir: Path, cfg) -> str:
    """``done`` (final checkpoint at the last round), ``resume`` (an earlier checkpoint) or ``new``.

    Raises:
        UserError: the folder holds a run of another config, or one with more rounds than asked.
    """
    folder = RunFolder(run_dir)
    resolved = folder.config
    if not resolved.is_file():
        return "new"
    difference = config_difference(with_defaults(yaml.safe_load(resolved.read_text())), cfg.to_dict(), IGNORED_KEYS)
    if difference:
        raise UserError(f"{run_dir} holds a run of another config ({difference}); "
                        f"choose another -name or remove that folder")
    latest = folder.latest
    if not latest.is_file():
        return "new"
    done = checkpoint_round(latest)
    rounds = cfg.server_config.max_iteration
    if done > rounds:
        raise UserError(f"{run_dir} already ran {done} rounds, more than server_config.max_iteration={rounds}; "
                        f"choose another -name")
    return "done" if done == rounds else "resume"


def launcher(nproc: int) -> list[str]:
    """The command prefix that starts a script with ``nproc`` processes: this Python alone for 1,
    pfedsim's launch.py (torch.distributed.run with pfedsim's exit statuses and quiet output)
    ``--standalone`` (a free local port per run, so runs can overlap) for more."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, importlib.util.find_spec("launch").origin, "--standalone", f"--nproc_per_node={nproc}"]


def trainer_command(run: SweepRun, sweep_dir: Path, args, resume: bool) -> list[str]:
    """The e2e_trainer.py command line of one run (the e2e_trainer module next to core/), with
    ``args.nproc`` processes on ``args.backend`` (both optional: 1 process by default)."""
    script = importlib.util.find_spec("e2e_trainer").origin
    nproc = getattr(args, "nproc", 1)
    data = ["-dataPath", args.dataPath] if getattr(args, "dataPath", None) else []  # a task reading no files needs none
    cmd = launcher(nproc) + [script] + data + ["-outputPath", str(sweep_dir), "-config", args.config, "-task",
                                               args.task, "-run_name", run.name, "-seed", str(run.seed)]
    if nproc > 1:
        cmd += ["-backend", getattr(args, "backend", "gloo")]
    for assignment in list(args.overrides) + run.overrides:
        cmd += ["--set", assignment]
    return cmd + (["-resume"] if resume else [])


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[-1].strip()


def _run_one(cmd: list[str], log: Path, env: dict) -> int:
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        handle.flush()
        return subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode


def launch(jobs: list[tuple[SweepRun, list[str]]], sweep_dir: Path, workers: int, procs_per_job: int = 1) -> list[str]:
    """Run the commands, ``workers`` at a time; each logs to ``sweep_dir/logs/<run>.log``.

    Unless OMP_NUM_THREADS is set, each of the ``workers * procs_per_job`` processes gets an equal
    share of the CPU cores as threads (at least 1).
    Returns the names of the runs that failed (non-zero exit), after printing one line per run.
    """
    log_dir = sweep_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (workers * procs_per_job))))
    env.setdefault("TQDM_DISABLE", "1")
    failed, started = [], time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run_one, cmd, log_dir / f"{run.name}.log", env): run for run, cmd in jobs}
        for i, future in enumerate(as_completed(futures), 1):
            run, rc = futures[future], future.result()
            log = log_dir / f"{run.name}.log"
            status = "done" if rc == 0 else f"FAILED (exit {rc}): {_last_error(log)} [see {log}]"
            print(f"[{i}/{len(jobs)}] {run.name}: {status} ({time.perf_counter() - started:.0f} s)", flush=True)
            if rc != 0:
                failed.append(run.name)
    return failed


def mean_std(values) -> tuple[float, float, int] | None:
    """(mean, sample std (n - 1; 0 for one value), n) of the non-None ``values``; None if there are none."""
    vals = np.array([v for v in values if v is not None], dtype=float)
    if not len(vals):
        return None
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """Per round of the first history, over the histories that reached it: the mean global test and
    personalized accuracy, their sample std (n - 1; None for one value) as ``global_test_std`` and
    ``personalized_std``, and ``seeds``, the number of histories (what
    :func:`utils.compare.compare_figure` draws as a mean with a band)."""
    out = []
    for rec in histories[0]:
        same = [r for h in histories for r in h if r["round"] == rec["round"]]
        glob = mean_std([r.get("global_test_acc") for r in same])
        pers = mean_std([r.get("personalized", {}).get("weighted_mean") for r in same])
        out.append({"round": rec["round"], "seeds": len(same),
                    "global_test_acc": glob[0] if glob else None,
                    "global_test_std": glob[1] if glob and glob[2] > 1 else None,
                    "personalized": {"weighted_mean": pers[0], "clients": 1} if pers else {},
                    "personalized_std": pers[1] if pers and pers[2] > 1 else None})
    return out


def aggregate(sweep_dir: Path, runs: list[SweepRun]) -> list[dict]:
    """One row per grid point: its values, the finished seeds' runs, and per score of
    :func:`utils.compare.run_scores` its (mean, std, n) over seeds (None without data)."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        row = rows.setdefault(run.point, {"point": run.point, "implied": run.implied, "runs": [], "histories": []})
        if run_status(sweep_dir / run.name, run.config) == "done":
            row["runs"].append(run.name)
            row["histories"].append(load_run(sweep_dir / run.name)["history"])
    for row in rows.values():
        scores = [run_scores(h) for h in row["histories"]]
        row.update({s: mean_std([sc[s] for sc in scores]) for s in SCORES})
        row["privacy"] = final_privacy(row["histories"])
    return list(rows.values())


def final_privacy(histories: list[list[dict]]) -> dict | None:
    """The privacy spent at the last evaluation of a grid point's runs (one history per seed):
    ``{"epsilon": float, "delta": float, "mechanism": str | None}``, epsilon ``inf`` for clipping
    without noise (``null`` in metrics.jsonl) and the largest over seeds (the seeds of a grid point
    spend the same, as the accountant reads only the config); mechanism None for runs recorded before
    records named it. None when no run reports privacy (``privacy.mechanism: none``)."""
    spent = [h[-1]["privacy"] for h in histories if h and h[-1].get("privacy")]
    if not spent:
        return None
    epsilons = [math.inf if dp.get("epsilon") is None else float(dp["epsilon"]) for dp in spent]
    return {"epsilon": max(epsilons), "delta": float(spent[0]["delta"]), "mechanism": spent[0].get("mechanism")}


def private(rows: list[dict]) -> bool:
    """Whether any grid point's runs report privacy (then the table, CSV and plots show epsilon)."""
    return any(row.get("privacy") for row in rows)


def epsilon_cell(row: dict) -> str:
    """A grid point's final privacy (:func:`final_privacy`) as ``epsilon (delta d)``, epsilon to 2
    decimals or ``inf``; ``no DP`` for finished runs without privacy, ``-`` without finished runs."""
    spent = row.get("privacy")
    if spent is None:
        return "no DP" if row["runs"] else "-"
    return epsilon_text(spent["epsilon"], spent["delta"])


def stat_cell(stat, digits: int = 2) -> str:
    """Percent ``mean ± std`` of a :func:`mean_std` triple of fractions, ``digits`` decimals; the mean
    alone for one seed (no std); ``-`` for None."""
    if stat is None:
        return "-"
    mean = f"{100 * stat[0]:.{digits}f}"
    return mean if stat[2] == 1 else f"{mean} ± {100 * stat[1]:.{digits}f}"


def markdown_table(rows: list[dict], axes: list[Axis]) -> str:
    """Per grid point: final and best global / personalized accuracy, mean ± std over seeds (percent),
    and when any run reports privacy the epsilon spent at the end with its delta (:func:`epsilon_cell`)."""
    head = [a.key for a in axes] + ["seeds", "final global", "best global", "final personalized", "best personalized"]
    dp = private(rows)
    head += ["final epsilon (delta)"] if dp else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [v for _, v in row["point"]] + [str(len(row["runs"]))] + [stat_cell(row[s]) for s in SCORES]
        cells += [epsilon_cell(row)] if dp else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], axes: list[Axis]) -> None:
    """CSV: grid values, seeds, and ``<score>_mean`` / ``<score>_std`` as fractions (empty: no data);
    when any run reports privacy also ``epsilon`` (spent at the last evaluation, ``inf`` without
    noise) and ``delta`` (both empty for a grid point without DP or without finished runs)."""
    import csv

    dp = private(rows)
    with open(path, "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow([a.key for a in axes] + ["seeds"] + [f"{s}_{m}" for s in SCORES for m in ("mean", "std")]
                     + (["epsilon", "delta"] if dp else []))
        for row in rows:
            stats = [("" if row[s] is None else f"{row[s][i]:.6f}") for s in SCORES for i in (0, 1)]
            spent = row.get("privacy")
            extra = ([f"{spent['epsilon']:.6g}", f"{spent['delta']:g}"] if spent else ["", ""]) if dp else []
            out.writerow([v for _, v in row["point"]] + [len(row["runs"])] + stats + extra)


def write_report(sweep_dir: Path, rows: list[dict], axes: list[Axis]) -> str:
    """sweep.md, sweep.csv and plots/accuracy.png (mean over seeds per grid point), and when runs
    report privacy plots/accuracy_vs_epsilon.png (:func:`epsilon_plot`); returns the table."""
    table = markdown_table(rows, axes)
    implied = [f"{assignment_slug(row['point'])}: " + ", ".join(f"{k}={v}" for k, v in row["implied"])
               for row in rows if row.get("implied")]
    note = ("\n\nSet by the sweep besides the grid (a method that chooses its own personal parameters ignores "
            "the config's personalization.local_layers): " + "; ".join(implied) + ".") if implied else ""
    if private(rows):
        note += ("\n\nFinal epsilon: the privacy the runs had spent at their last evaluation, at the delta "
                 "given (the largest over seeds); inf: clipping without noise (noise_multiplier 0); no DP: "
                 "privacy.mechanism none; -: no finished run. Plotted in plots/accuracy_vs_epsilon.png.")
    (sweep_dir / "sweep.md").write_text(f"# Sweep {sweep_dir.name}\n\nAccuracy in percent, mean ± sample std "
                                        f"over seeds (final: last round; best: at the evaluation that chose best.pt, by a validation metric, or by the highest global test accuracy when a run has no validation split).{note}\n\n{table}\n")
    write_csv(sweep_dir / "sweep.csv", rows, axes)
    curves = [{"name": assignment_slug(row["point"]) or "runs", "history": mean_history(row["histories"])}
              for row in rows if row["histories"]]
    if curves:
        compare_plot(curves, sweep_dir / "plots" / "accuracy.png",
                     f"Sweep {sweep_dir.name}: test accuracy per round, mean over seeds (band: ± sample std)\n"
                     f"solid: global model, full test set; dashed: personalized models (sample-weighted)")
    if epsilon_series(rows, axes):
        epsilon_plot(rows, axes, sweep_dir / EPSILON_PLOT, sweep_dir.name)
    return table


EPSILON_PLOT = Path("plots") / "accuracy_vs_epsilon.png"
NOISE_KEYS = frozenset({"privacy", "privacy.noise_multiplier", "privacy.target_epsilon"})


def epsilon_series(rows: list[dict], axes: list[Axis]) -> dict[str, list[dict]]:
    """The grid points with finished runs that report privacy, one series per value of every grid
    axis except those that set the noise (:data:`NOISE_KEYS`), each sorted by final epsilon; keyed
    by the series' :func:`assignment_slug` (``runs`` when no other axis exists). Empty without DP."""
    noise = {a.key for a in axes if a.key in NOISE_KEYS}
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("privacy") and row["runs"]:
            name = assignment_slug([(k, v) for k, v in row["point"] if k not in noise]) or "runs"
            series.setdefault(name, []).append(row)
    return {name: sorted(points, key=lambda r: r["privacy"]["epsilon"]) for name, points in series.items()}


def infinity_position(epsilons: list[float]) -> float:
    """Where infinite epsilon (no noise) is drawn on the log x-axis: 4 times the largest finite
    epsilon, at the right edge (1.0 when every epsilon is infinite)."""
    finite = [e for e in epsilons if math.isfinite(e)]
    return 4 * max(finite) if finite else 1.0


def _draw_series(ax, name: str, points: list[dict], inf_x: float) -> None:
    """Final global (solid, circles) and personalized (dashed, triangles) accuracy in percent against
    final epsilon, one colour; error bars of ± sample std over seeds where a point has several."""
    x = [inf_x if math.isinf(r["privacy"]["epsilon"]) else r["privacy"]["epsilon"] for r in points]
    seeds = max(len(r["runs"]) for r in points)
    what = f" (mean of {seeds} seeds, bars ± std)" if seeds > 1 else ""
    color = None
    for words, style, score in (("global", "o-", "final_global"), ("personalized", "^--", "final_personalized")):
        stats = [r[score] for r in points]
        if all(st is None for st in stats):
            continue
        y = [math.nan if st is None else 100 * st[0] for st in stats]
        err = [0.0 if st is None else 100 * st[1] for st in stats] if seeds > 1 else None
        bars = ax.errorbar(x, y, yerr=err, fmt=style, color=color, capsize=3, label=f"{name} {words}{what}")
        color = bars.lines[0].get_color()


def epsilon_ticks(epsilons: list[float]) -> list[float]:
    """The finite epsilons as x ticks, ascending, each at least 1.25 times the previous one kept (so
    that their labels do not overlap on the log axis)."""
    ticks: list[float] = []
    for e in sorted(e for e in set(epsilons) if math.isfinite(e) and e > 0):
        if not ticks or e >= 1.25 * ticks[-1]:
            ticks.append(e)
    return ticks


def _epsilon_axis(ax, epsilons: list[float], inf_x: float) -> None:
    """Log x-axis ticked at the finite epsilons (:func:`epsilon_ticks`), with the no-noise point at
    ``inf_x`` labelled ``inf (no noise)`` past a dotted break line."""
    ticks = epsilon_ticks(epsilons)
    ax.set_xscale("log")
    ax.set_xlim((ticks[0] if ticks else inf_x) / 2, inf_x * 2)
    labels = [f"{t:.3g}" for t in ticks]
    if any(math.isinf(e) for e in epsilons):
        if ticks:
            ax.axvline(math.sqrt(ticks[-1] * inf_x), color="grey", linestyle=":", linewidth=1)
        ticks, labels = ticks + [inf_x], labels + ["inf\n(no noise)"]
    ax.minorticks_off()
    ax.set_xticks(ticks, labels)


def epsilon_title(points: list[dict], sweep_name: str) -> str:
    """The title of :func:`epsilon_figure`: the delta the epsilons are at (and the mechanism, when the
    ``points``' records name one), and what global and personalized accuracy measure."""
    deltas = sorted({r["privacy"]["delta"] for r in points})
    at = f"delta {deltas[0]:g}" if len(deltas) == 1 else "each point's delta: sweep.csv"
    mechanisms = {r["privacy"].get("mechanism") for r in points} - {None}
    at += f", privacy.mechanism {mechanisms.pop()}" if len(mechanisms) == 1 else ""
    return (f"Sweep {sweep_name}: final test accuracy against epsilon ({at})\n"
            f"global: the global model on the full test set (a method's personal layers: the clients' mean)\n"
            f"personalized: each client's personalized model on its own test split (sample-weighted mean over clients)")


def epsilon_plot(rows: list[dict], axes: list[Axis], path: Path, sweep_name: str) -> None:
    """PNG at ``path`` of :func:`epsilon_figure` (folders made as needed).

    Raises:
        ValueError: no grid point has finished runs that report privacy.
    """
    from utils.report import save_figure

    save_figure(epsilon_figure(rows, axes, sweep_name), path)


def epsilon_figure(rows: list[dict], axes: list[Axis], sweep_name: str):
    """Figure of final test accuracy (percent) against the epsilon spent by the end of each run (log
    x-axis, no noise drawn at the right edge as ``inf``): one colour per :func:`epsilon_series`,
    global and personalized accuracy as in the runs' own lines. The title names the delta.

    Raises:
        ValueError: no grid point has finished runs that report privacy.
    """
    from utils.report import new_figure

    series = epsilon_series(rows, axes)
    if not series:
        raise ValueError("no grid point has finished runs that report privacy")
    points = [r for pts in series.values() for r in pts]
    epsilons = [r["privacy"]["epsilon"] for r in points]
    inf_x = infinity_position(epsilons)
    fig, ax = new_figure(8, 5)
    for name, pts in series.items():
        _draw_series(ax, name, pts, inf_x)
    _epsilon_axis(ax, epsilons, inf_x)
    ax.set_xlabel("epsilon spent by the end of the run (log scale)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(epsilon_title(points, sweep_name), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def clear_incomplete(run_dir: Path) -> None:
    """Remove a run folder that holds no checkpoint (it cannot be resumed; it is started again)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
