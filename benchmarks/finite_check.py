"""What the non-finite update check costs: the engine's round with the check, and the same round with
the check replaced by a constant "finite", timed alternately (one of each per pair, so drift in the
machine's load hits both). Also times the check alone on the workload's model.

Each pair runs one round number twice (the same cohort, so the same steps), checked then unchecked.
Ratio = median checked round / median unchecked round (1.00 = free).

    python -m benchmarks.finite_check --device cpu --data synthetic --pairs 8
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import benchmark_parser, machine, median, save, single_process_simulation, timed
from core.flat import StateLayout
from core.server import Server


def unchecked(layout, *extra, sync_free=None):
    """Stand-in for StateLayout.keep_if_finite_ that checks nothing."""
    return torch.ones((), dtype=torch.bool, device=layout._float[0].device)


def main() -> None:
    parser = benchmark_parser(__doc__, "finite_check", "cpu")
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    cfg, sim = single_process_simulation(args.config, args.data, args.device, args.overrides)
    check = StateLayout.keep_if_finite_
    alone = timed(lambda: sim.layout.keep_if_finite_(torch.zeros((), device=sim.ctx.device)), sim.ctx.device, 50)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        server._round(1)  # warm-up
        on, off = [], []
        for pair in range(args.pairs):  # round r twice: the same cohort, so the same steps
            r = 2 + pair
            on += timed(lambda: server._round(r), sim.ctx.device, 1)
            StateLayout.keep_if_finite_ = unchecked
            try:
                off += timed(lambda: server._round(r), sim.ctx.device, 1)
            finally:
                StateLayout.keep_if_finite_ = check
        server.close()
    result = {"benchmark": "finite_check", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": args.device, "data": "synthetic" if args.data == "synthetic" else "cifar10",
              "config": args.config, "overrides": args.overrides, "cohort": sim.schedule.cohort_size(1),
              "parameters": sim.layout.num_params, "check_alone_ms": 1e3 * median(alone),
              "checked_round_s": median(on), "unchecked_round_s": median(off), "ratio": median(on) / median(off),
              "checked_all": on, "unchecked_all": off}
    save(result, Path(args.out))


if __name__ == "__main__":
    main()
