"""Evaluation round cost: the engine's evaluation vs the separate full-test pass it no longer makes.

An evaluation runs the global model on every client's local test split and each trained client's
personalized model on its split. When the splits hold every test sample once, the full-test
accuracy is the pooled count of those predictions; before 2026-12-03 the server made one more pass
of the global model over the whole test set. This times, in one process after ``--rounds`` training
rounds: the evaluation as it runs now (``Server._evaluate``), and that extra pass
(``full_test_accuracy``), alternately, and checks that both give the same accuracy.

    python -m benchmarks.evaluation --data ../shared/data/cifar10
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import benchmark_parser, machine, median, save, single_process_simulation, timed
from core.evaluation import full_test_accuracy
from core.server import Server


def main() -> None:
    parser = benchmark_parser(__doc__, "evaluation", "cpu", config="experiments/cv/config_cpu.yaml", repeats=5)
    parser.add_argument("--rounds", type=int, default=2, help="training rounds before timing (trained clients)")
    args = parser.parse_args()
    _, sim = single_process_simulation(args.config, args.data, args.device, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        for r in range(1, args.rounds + 1):
            server._round(r)
        evaluation, extra_pass, records, accuracies = [], [], [], []
        for _ in range(args.repeats):
            evaluation += timed(lambda: records.append(server._evaluate(args.rounds, 0.0, 0.0)), sim.ctx.device, 1)
            extra_pass += timed(lambda: accuracies.append(full_test_accuracy(sim, server.global_flat)),
                                sim.ctx.device, 1)
        server.close()
    derived = records[0]["global_test_acc"]
    if derived != accuracies[0]:  # same weights and images; on a GPU, batch-shape-dependent kernels can flip an argmax
        print(f"note: accuracy from the client splits {derived} vs its own pass {accuracies[0]}", file=sys.stderr)
    now, extra = median(evaluation), median(extra_pass)
    save({"benchmark": "evaluation", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
          "device": args.device, "config": args.config, "data": args.data, "overrides": args.overrides,
          "rounds_trained": args.rounds, "test_samples": len(sim.test_loader.dataset.labels),
          "personalized_clients": records[0].get("personalized", {}).get("clients", 0),
          "evaluation_s": now, "separate_full_pass_s": extra, "before_s": now + extra,
          "speedup": (now + extra) / now, "global_test_acc": derived, "separate_pass_acc": accuracies[0],
          "evaluation_runs_s": evaluation, "full_pass_runs_s": extra_pass}, Path(args.out))


if __name__ == "__main__":
    main()
