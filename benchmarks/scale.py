"""Item 3: scale. Many clients (default 100,000, Dirichlet 0.1 over synthetic CIFAR-shaped images),
1,000 per round: partition time, seconds per round, and peak host/device memory of every rank.

CIFAR-10 has 50,000 training images, too few for 100,000 clients, so this uses random uint8 images
of CIFAR shape (``--samples`` of them). Run under torch.distributed.run for a server + workers split:

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/scale.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, machine, round_times, save, task_for  # noqa: E402
from core.config import load_config  # noqa: E402
from core.partition import partition  # noqa: E402
from core.runner import run_experiment  # noqa: E402


def partition_seconds(samples: int, clients: int, alpha: float, min_samples: int) -> float:
    labels = np.arange(samples) % 10
    start = time.perf_counter()
    partition(labels, np.arange(10_000) % 10, "dirichlet", clients, seed=0, alpha=alpha, min_samples=min_samples)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--cohort", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3, help="rounds run; the mean leaves out the first (warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.jsonl"))
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", 0))
    part_s = partition_seconds(args.samples, args.clients, args.alpha, 2) if rank == 0 else None
    overrides = [f"device={args.device}", f"data_config.num_clients={args.clients}", "data_config.partition=dirichlet",
                 f"data_config.alpha={args.alpha}", "data_config.min_samples=2",
                 f"server_config.num_clients_per_iteration={args.cohort}", f"server_config.max_iteration={args.rounds}",
                 f"server_config.val_freq={args.rounds}", "server_config.ckpt_freq=0",
                 "personalization.method=fedper", "personalization.local_layers=[linear]"] + args.overrides
    cfg = load_config(REPO / "benchmarks/configs/pfl_cnn_50x50.yaml", overrides)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        history = run_experiment(cfg, task_for("synthetic", args.samples), "synthetic", Path(tmp), "gloo", None)
    record = {"benchmark": "scale", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": args.device,
              "rank": rank, "processes": int(os.environ.get("WORLD_SIZE", 1)), "clients": args.clients,
              "cohort": args.cohort, "samples": args.samples, "alpha": args.alpha, "overrides": args.overrides,
              "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
              "peak_device_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
              "total_s": time.perf_counter() - start}
    if history is not None:
        round_s, sec_per_round = round_times(history)
        record.update({"partition_s": part_s, "sec_per_round": sec_per_round, "round_s": round_s,
                       "trained_clients_with_test_data": history[-1]["personalized"]["clients"]})
    save(record, Path(args.out))


if __name__ == "__main__":
    main()
