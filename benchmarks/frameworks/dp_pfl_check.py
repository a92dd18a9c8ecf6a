"""Companion of run_pfl_dp.py (issue 25): the pfedsim row of benchmarks/results/dp_pfl.jsonl, and the
cross-check of the two sides' privacy accounting.

``record RUN_DIR`` (pfedsim's venv): appends one row for a finished pfedsim run of
benchmarks/configs/pfl_cnn_dp.yaml: noise multiplier and epsilon from its metrics.jsonl, test accuracy
at each evaluation, seconds per round (the sum of its ``round_s``, evaluation excluded), machine,
versions, config.

``accounting --rounds R --population N [--other-z Z]``: in pfl's venv computes pfl's side
(``PLDPrivacyAccountant`` as run_pfl_dp.py builds it), in pfedsim's venv pfedsim's side
(``core.privacy.calibrate_noise`` / ``epsilon`` with the PLD accountant): the noise multiplier that
spends epsilon 2 at delta 1e-6 in R rounds of sampling rate 1000 / N, this side's epsilon at it, and at
``--other-z`` (the other side's multiplier). Prints one JSON line and appends it to dp_pfl.jsonl.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = REPO / "benchmarks" / "results" / "dp_pfl.jsonl"
EPSILON, DELTA, COHORT, NOISE_COHORT = 2.0, 1e-6, 50, 1000


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def append(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def git_version() -> str:
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.rstrip()
    dirty = sorted({line[3:] for line in git("status", "--porcelain", "--", "core").splitlines() if line.strip()})
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in " + ", ".join(dirty) if dirty else "")


def record(run_dir: Path) -> None:
    import torch
    import yaml

    recs = sorted((json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()),
                  key=lambda r: r["round"])
    last = recs[-1]
    cfg = yaml.safe_load(open(run_dir / "config.resolved.yaml"))
    round_s = [s for r in recs for s in r["round_s"]]
    rounds = last["round"]
    p = last["privacy"]
    append({
        "framework": "pfedsim", "version": f"git {git_version()}, torch {torch.__version__}, "
                                           f"dp-accounting {dist_version('dp-accounting')}",
        "python": platform.python_version(), "cpu": cpu_model(), "threads": 1,
        "date": time.strftime("%Y-%m-%d %H:%M"), "run": str(run_dir),
        "rounds": rounds, "cohort": cfg["server_config"]["num_clients_per_iteration"],
        "cohort_sampling": "Poisson, expected 50 (Binomial(1000, 0.05) then a uniform subset), fixed denominator 50",
        "clients": cfg["data_config"]["num_clients"], "local_lr": cfg["client_config"]["optimizer_config"]["lr"],
        "central_lr": cfg["server_config"]["optimizer_config"]["lr"], "batch": cfg["client_config"]["batch_size"],
        "local_epochs": cfg["client_config"]["local_epochs"], "weighting": "uniform", "model": "PflCNN",
        "config": "benchmarks/configs/pfl_cnn_dp.yaml",
        "privacy": {"accountant": f"pfedsim {p['accountant']} (dp-accounting)", "target_epsilon":
                    cfg["privacy"]["target_epsilon"], "delta": p["delta"], "clip": p["clip_norm"],
                    "noise_cohort_size": cfg["privacy"]["noise_cohort_size"],
                    "population": cfg["privacy"]["population"], "sampling_rate": p["sampling_rate"],
                    "noise_multiplier": p["noise_multiplier"], "epsilon": p["epsilon"],
                    "noise_std_sum": p["noise_multiplier"] * p["clip_norm"] * COHORT / NOISE_COHORT,
                    "clipped_share_last": p["clipped_share"]},
        "final_test_acc": last["global_test_acc"],
        "evals": [{"round": r["round"], "test_acc": r["global_test_acc"], "epsilon": r["privacy"]["epsilon"]}
                  for r in recs],
        "dropped_clients": sum(sum(r.get("dropped_clients", [])) for r in recs),
        "train_s": round(sum(round_s), 2), "s_per_round": round(sum(round_s) / rounds, 3),
        "s_per_round_2_on": round(sum(round_s[1:]) / max(rounds - 1, 1), 3),
        "elapsed_s": round(last["elapsed_s"], 2),
        "timing": "s_per_round: the mean of pfedsim's round_s (the training time of each round, evaluation "
                  "excluded)",
    })


def accounting(rounds: int, population: float, other_z: float | None) -> None:
    q = NOISE_COHORT / population
    try:
        from pfl.privacy import PLDPrivacyAccountant
    except ImportError:
        PLDPrivacyAccountant = None
    t = time.perf_counter()
    if PLDPrivacyAccountant is not None:
        import pfl

        def eps_at(z):
            return float(PLDPrivacyAccountant(num_compositions=rounds, sampling_probability=q, mechanism="gaussian",
                                              noise_parameter=z, delta=DELTA,
                                              noise_scale=COHORT / NOISE_COHORT).epsilon)
        side = f"pfl {pfl.__version__} PLDPrivacyAccountant (dp-accounting {dist_version('dp-accounting')})"
        z = float(PLDPrivacyAccountant(num_compositions=rounds, sampling_probability=q, mechanism="gaussian",
                                       epsilon=EPSILON, delta=DELTA, noise_scale=COHORT / NOISE_COHORT).noise_parameter)
    else:
        sys.path.insert(0, str(REPO))
        from core.privacy import DpSchedule, calibrate_noise, epsilon

        def eps_at(z):
            return epsilon(DpSchedule(z, q, rounds), DELTA, "pld")
        side = f"pfedsim core.privacy pld (dp-accounting {dist_version('dp-accounting')})"
        z = calibrate_noise(EPSILON, DELTA, q, rounds, "pld")
    row = {"kind": "accounting", "side": side, "rounds": rounds, "population": population, "sampling_rate": q,
           "target_epsilon": EPSILON, "delta": DELTA, "noise_multiplier": z, "epsilon_at_own_z": eps_at(z)}
    if other_z is not None:
        row.update({"other_z": other_z, "epsilon_at_other_z": eps_at(other_z)})
    row["seconds"] = round(time.perf_counter() - t, 1)
    append(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("run_dir", type=Path)
    acc = sub.add_parser("accounting")
    acc.add_argument("--rounds", type=int, required=True)
    acc.add_argument("--population", type=float, default=1e6)
    acc.add_argument("--other-z", type=float)
    args = parser.parse_args()
    if args.cmd == "record":
        record(args.run_dir)
    else:
        accounting(args.rounds, args.population, args.other_z)


if __name__ == "__main__":
    main()
