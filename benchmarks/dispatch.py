"""Operator counts per round: how many tensor operations one FL round dispatches, by path.

On a GPU a round of small batches is launch-bound: the host's cost is about one kernel launch per
dispatched operation, so the count of operations that compute (views and profiler markers excluded)
predicts how a path scales there. Counts do not depend on the machine, so this runs on a CPU.
Counted below autograd and torch.func (a ``TorchDispatchMode``), for one round after a warm-up
round, for: sequential clients, vectorized clients (``client_config.vectorize``) with the loader's
batch plans (one ``collate`` per step) and with per-client batches stacked, and centralized training
of the same samples at the client batch size (the baseline of benchmarks/overhead.py) and at batch
(cohort x client batch) (the baseline of benchmarks/vectorized.py).

    python -m benchmarks.dispatch --data synthetic
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import benchmark_parser, cohort_samples, machine, save, single_process_simulation
from benchmarks.overhead import centralized_steps
from core.dataset import BaseDataLoader
from core.server import Server
from utils.op_count import OpCounter, count_ops


class PerClientBatches(BaseDataLoader):
    """The path of a task loader that implements ``batches`` alone: wraps a loader, hides its plans."""

    def __init__(self, inner: BaseDataLoader):
        super().__init__(inner.dataset, inner.batch_size, inner.device, inner.train, inner.augment)
        self.batches = inner.batches


def round_ops(args, overrides: list[str], plans: bool = True) -> OpCounter:
    """Ops of round 2 of a fresh single-process simulation (round 1 warms up)."""
    _, sim = single_process_simulation(args.config, args.data, args.device, args.overrides + overrides)
    if not plans:
        sim.vectorized.loader = PerClientBatches(sim.vectorized.loader)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        server._round(1)
        counter = count_ops(lambda: server._round(2))
        server.close()
    return counter


def main() -> None:
    parser = benchmark_parser(__doc__, "dispatch", "cpu")
    args = parser.parse_args()
    paths = {"sequential": round_ops(args, []),
             "vectorized": round_ops(args, ["client_config.vectorize=true"]),
             "vectorized_stacked_batches": round_ops(args, ["client_config.vectorize=true"], plans=False)}
    cfg, sim = single_process_simulation(args.config, args.data, args.device, args.overrides)
    samples = cohort_samples(sim)
    small = cfg.client_config.batch_size
    for batch in (small, sim.schedule.cohort_size(1) * small):
        _, csim = single_process_simulation(args.config, args.data, args.device,
                                            args.overrides + [f"client_config.batch_size={batch}"])
        run = centralized_steps(csim, csim.cfg, samples // batch)(csim.layout.flatten(), 1)
        run()
        paths[f"centralized_batch_{batch}"] = count_ops(run)
    result = {"benchmark": "dispatch", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": args.device, "config": args.config, "overrides": args.overrides,
              "computing_ops": {name: c.computing() for name, c in paths.items()},
              "all_ops": {name: sum(c.ops.values()) for name, c in paths.items()},
              "top_ops": {name: dict(c.ops.most_common(12)) for name, c in paths.items()}}
    save(result, Path(args.out))


if __name__ == "__main__":
    main()
