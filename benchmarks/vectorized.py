"""Item 2: vectorized cohorts. ms per round, sequential vs ``client_config.vectorize``, and
centralized training at batch (cohort x client batch) doing the same number of samples.

    python benchmarks/vectorized.py --device cuda
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import benchmark_parser, cohort_samples, machine, median, save, single_process_simulation, timed
from benchmarks.overhead import centralized_steps
from core.server import Server


def round_seconds(config, data, device, overrides, repeats) -> tuple[float, object, object]:
    cfg, sim = single_process_simulation(config, data, device, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        rounds = iter(range(1, 10_000))
        times = timed(lambda: server._round(next(rounds)), sim.ctx.device, repeats + 2)[2:]
        server.close()
    return median(times), cfg, sim


def main() -> None:
    parser = benchmark_parser(__doc__, "vectorized", "cuda", repeats=5)
    args = parser.parse_args()
    seq, cfg, sim = round_seconds(args.config, args.data, args.device, args.overrides, args.repeats)
    vec, _, _ = round_seconds(args.config, args.data, args.device,
                              args.overrides + ["client_config.vectorize=true"], args.repeats)
    cohort = sim.schedule.cohort_size(1)
    samples = cohort_samples(sim)
    big = cohort * cfg.client_config.batch_size
    _, csim = single_process_simulation(args.config, args.data, args.device,
                                        args.overrides + [f"client_config.batch_size={big}"])
    start, initial = centralized_steps(csim, csim.cfg, samples // big), csim.layout.flatten()
    passes = [timed(start(initial, 1), csim.ctx.device, 1)[0] for _ in range(args.repeats + 2)]  # each from the same weights
    central = median(passes[2:])
    save({"benchmark": "vectorized", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": args.device,
          "config": args.config, "overrides": args.overrides, "cohort": cohort, "samples_per_round": samples,
          "sequential_ms": seq * 1e3, "vectorized_ms": vec * 1e3, "speedup": seq / vec,
          "centralized_batch": big, "centralized_ms": central * 1e3, "vectorized_vs_centralized": vec / central},
         Path(args.out))


if __name__ == "__main__":
    main()
