"""What the delta-first aggregation costs (issue 23): a client's contribution to the weighted sum,
added as ``w * (state - global)`` (now) or as ``w * state`` with ``sum(w) * global`` subtracted once per
round (before), timed alternately on the config's model, and the engine's round for scale.

Estimated round ratio = (round + cohort x (per-client now - per-client before)) / round, with the
round timed on the new code.

    python -m benchmarks.aggregation --device cpu --data synthetic --repeats 200
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import benchmark_parser, machine, median, save, single_process_simulation, timed
from core.server import Server


def whole_weight_add(layout, out: torch.Tensor, alpha: float) -> None:
    """The previous form: ``out += alpha * state`` straight from the module (the subtraction of
    ``sum(alpha) * global`` happened once per worker and round, so it is left out here)."""
    views = out.split(layout.numels)
    with torch.no_grad():
        torch._foreach_add_([views[i] for i in layout._float_pos], [t.reshape(-1) for t in layout._float],
                            alpha=alpha)


def main() -> None:
    parser = benchmark_parser(__doc__, "aggregation", "cpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    cfg, sim = single_process_simulation(args.config, args.data, args.device, args.overrides)
    out = torch.zeros(sim.layout.numel, device=sim.ctx.device)
    start = sim.layout.flatten()
    now, before = [], []
    for _ in range(args.repeats // 10):  # alternating blocks of 10, so drift in the load hits both
        now += timed(lambda: sim.layout.accumulate_delta_(out, 3.0, start), sim.ctx.device, 10)
        before += timed(lambda: whole_weight_add(sim.layout, out, 3.0), sim.ctx.device, 10)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        server._round(1)  # warm-up
        rounds = [t for r in range(2, 2 + args.rounds) for t in timed(lambda: server._round(r), sim.ctx.device, 1)]
        server.close()
    cohort = sim.schedule.cohort_size(1)
    extra = cohort * (median(now) - median(before))
    result = {"benchmark": "aggregation", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": args.device, "data": "synthetic" if args.data == "synthetic" else "cifar10",
              "config": args.config, "overrides": args.overrides, "cohort": cohort,
              "parameters": sim.layout.num_params, "delta_first_ms": 1e3 * median(now),
              "whole_weight_ms": 1e3 * median(before), "round_s": median(rounds), "rounds_all": rounds,
              "estimated_round_ratio": (median(rounds) + extra) / median(rounds)}
    save(result, Path(args.out))


if __name__ == "__main__":
    main()
