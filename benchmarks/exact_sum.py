"""What the order-independent (fixed-point int64) sum costs (issue 23): the engine's round with the
exact sum, and the same round with the float32 sum it replaced (the strategy's ``exact_sum`` set to
False: the previous code path, still DGA's), timed alternately. Also times one client's contribution
alone both ways on the config's model.

Each pair runs one round number twice (the same cohort, so the same steps), the two sums in
alternating order, so drift in the machine's load hits both. Ratio = median exact round / median
float32 round (1.00 = free); the per-pair ratios are recorded too.

    python -m benchmarks.exact_sum --device cpu --data synthetic --pairs 8
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import benchmark_parser, machine, median, save, single_process_simulation, timed
from core.exact import FixedPointSums
from core.server import Server


def main() -> None:
    parser = benchmark_parser(__doc__, "exact_sum", "cpu")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200, help="calls of each per-client contribution")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    cfg, sim = single_process_simulation(args.config, args.data, args.device, args.overrides)
    device, layout = sim.ctx.device, sim.layout
    start = layout.flatten()
    with torch.no_grad():  # a trained-looking replica: the global state plus a small update
        layout.load_(start + 1e-3 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0)).to(device))
    floats = torch.zeros(layout.numel, device=device)
    fixed = FixedPointSums(torch.zeros(layout.numel, dtype=torch.int64, device=device),
                           torch.zeros(0, dtype=torch.int64, device=device), sim.schedule.cohort_size(1))
    ok = torch.ones((), dtype=torch.bool, device=device)

    def exact_client():
        layout.delta_(fixed.delta, start)
        fixed.add_(ok, 0.02)

    exact_ms, float_ms = [], []
    for _ in range(args.repeats // 10):  # alternating blocks of 10
        exact_ms += timed(exact_client, device, 10)
        float_ms += timed(lambda: layout.accumulate_delta_(floats, 3.0, start), device, 10)
    strategy = sim.strategy
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        for exact in (True, False):  # warm-up of both paths
            strategy.exact_sum = exact
            server._round(1)
        on, off = [], []
        try:
            for pair in range(args.pairs):  # round r twice: the same cohort, so the same steps
                r = 2 + pair
                for exact in ((True, False) if pair % 2 == 0 else (False, True)):
                    strategy.exact_sum = exact
                    (on if exact else off).extend(timed(lambda: server._round(r), device, 1))
        finally:
            del strategy.exact_sum  # back to the class's value
        server.close()
    result = {"benchmark": "exact_sum", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": args.device, "data": "synthetic" if args.data == "synthetic" else "cifar10",
              "config": args.config, "overrides": args.overrides, "cohort": sim.schedule.cohort_size(1),
              "parameters": layout.num_params, "numel": layout.numel,
              "exact_client_ms": 1e3 * median(exact_ms), "float32_client_ms": 1e3 * median(float_ms),
              "exact_round_s": median(on), "float32_round_s": median(off), "ratio": median(on) / median(off),
              "pair_ratios": [a / b for a, b in zip(on, off)], "exact_all": on, "float32_all": off}
    save(result, Path(args.out))


if __name__ == "__main__":
    main()
