"""Item 4: 1, 2, 4 processes (rank 0 server, which trains a share too, + workers) on one device: seconds per round.

Run under torch.distributed.run; each process builds the simulation on synthetic CIFAR-shaped data
(or real data with --data PATH) and rank 0 writes the mean training time of rounds 2 onwards as the
server measured it (round 1 warms up; evaluation rounds' evaluations are not counted).

    for n in 1 2 4; do python -m torch.distributed.run --nproc_per_node=$n benchmarks/workers.py --device cuda; done
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, benchmark_parser, machine, round_times, save, task_for  # noqa: E402
from core.config import load_config  # noqa: E402
from core.runner import run_experiment  # noqa: E402


def main() -> None:
    parser = benchmark_parser(__doc__, "workers", "cpu")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    overrides = args.overrides + [f"device={args.device}", f"server_config.max_iteration={args.rounds}",
                                  "server_config.val_freq=2", "server_config.ckpt_freq=0"]
    cfg = load_config(REPO / args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        history = run_experiment(cfg, task_for(args.data), args.data, Path(tmp), args.backend, None)
    if history is not None:
        world = int(os.environ.get("WORLD_SIZE", 1))
        round_s, sec_per_round = round_times(history)
        save({"benchmark": "workers", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": args.device, "backend": args.backend, "processes": world, "data": args.data,
              "training_ranks": world, "config": args.config, "overrides": args.overrides,
              "sec_per_round": sec_per_round, "round_s": round_s}, Path(args.out))


if __name__ == "__main__":
    main()
