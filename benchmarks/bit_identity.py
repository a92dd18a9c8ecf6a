"""Behaviour check across commits (issue 24, "must not change"): the same config and seed must give
the same model, bit for bit, before and after a refactor, on the same machine.

Each commit is checked out in a temporary git worktree; every case (the main job's CPU config, a
SCAFFOLD, a Ditto and a vectorized variant of it, each shortened to ``--rounds`` rounds) runs there
with ``e2e_trainer.py`` in one process, and the final checkpoint's global state, client store and
strategy state are compared with the first commit's: identical bits, or the largest absolute
difference where a summation order changed on purpose.

    python -m benchmarks.bit_identity --data ../shared/data/cifar10 --commits 5f8df28 HEAD --rounds 3

Writes one JSON line per (case, commit) to benchmarks/results/bit_identity.jsonl.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, machine, save

CPU = "experiments/cv/config_cpu.yaml"
CASES = {  # name -> --set overrides of the main job's CPU config
    "fedper": [],
    "scaffold": ["strategy=scaffold", "client_config.optimizer_config.momentum=0.0",
                 "client_config.optimizer_config.weight_decay=0.0"],
    "ditto": ["personalization.method=ditto", "personalization.local_layers=[]"],
    "vectorized": ["client_config.vectorize=true", "client_config.vectorize_chunk=5"],
}


def _run(tree: Path, case: str, data: str, out: Path, rounds: int) -> dict[str, torch.Tensor]:
    """Train ``case`` in the worktree ``tree``; the final checkpoint's tensors, flattened by name."""
    sets = CASES[case] + [f"server_config.max_iteration={rounds}", f"server_config.val_freq={rounds}",
                          f"server_config.ckpt_freq={rounds}"]
    cmd = [sys.executable, "e2e_trainer.py", "-dataPath", data, "-outputPath", str(out), "-config", CPU,
           "-task", "cv", "-run_name", case] + [arg for s in sets for arg in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}  # the same threads in every run
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{case} at {tree.name}: exit {done.returncode}\n{done.stderr[-2000:]}")
    ckpt = torch.load(out / case / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    tensors = {"global": ckpt["global"], "strategy_state": ckpt["strategy_state"]}
    for cid, row in sorted(ckpt["client_store"].get("entries", {}).items()):
        tensors[f"client {cid}"] = row
    return tensors


def _compare(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """Bit identity and the largest absolute difference of each tensor both runs hold."""
    if reference.keys() != other.keys():
        return {"identical": False, "keys_differ": sorted(set(reference) ^ set(other))}
    diffs = {k: float((reference[k].double() - other[k].double()).abs().max()) if reference[k].numel() else 0.0
             for k in reference}
    same = all(torch.equal(reference[k], other[k]) for k in reference)
    return {"identical": same, "max_abs_diff": max(diffs.values(), default=0.0),
            "global_max_abs_diff": diffs["global"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder holding cifar-10-batches-py")
    parser.add_argument("--commits", nargs="+", required=True, help="the first is the reference")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bit_identity.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in every run (OMP_NUM_THREADS=1), so that machine() says so
    data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        trees = []
        for commit in args.commits:
            sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=REPO, capture_output=True,
                                 text=True, check=True).stdout.strip()
            tree = Path(tmp) / sha
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=REPO, check=True,
                           capture_output=True)
            trees.append(tree)
        try:
            for case in args.cases:
                runs = [_run(tree, case, data, Path(tmp) / "out" / tree.name, args.rounds) for tree in trees]
                for tree, run in zip(trees[1:], runs[1:]):
                    save({"benchmark": "bit_identity", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                          "case": case, "rounds": args.rounds, "reference": trees[0].name, "commit": tree.name,
                          **_compare(runs[0], run)}, Path(args.out))
        finally:
            for tree in trees:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)


if __name__ == "__main__":
    main()
