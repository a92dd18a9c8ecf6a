"""Item 1: simulation overhead. One FL round vs centralized training doing the same optimizer steps.

The FL round is the engine's real round (cohort sampling, broadcast/reduce buffers, per-client reset
of the one replica, local training, weighted delta sums, server step). The centralized baseline trains
a model of the same class for the same number of steps at the same batch size, with the same loader
and optimizer (and the same ``precision`` / ``channels_last`` switches). The two are timed
alternately, one FL round then one centralized pass, so that drift in the machine's load hits both.
Ratio = median FL round seconds / median centralized seconds (1.00 = no overhead).

    python benchmarks/overhead.py --device cpu --data ../shared/data/cifar10
    python benchmarks/overhead.py --device cuda --data synthetic
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import benchmark_parser, machine, median, save, single_process_simulation, timed
from core.optim import build_optimizer
from core.server import Server


def centralized_steps(sim, cfg, steps: int):
    """A closure training a fresh replica for ``steps`` batches of the client batch size, on the
    samples of round 1's cohort pooled together (the same images the FL round reads)."""
    model = type(sim.model)(cfg.model).to(sim.ctx.device)
    if cfg.client_config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.client_config.optimizer_config)
    loader = sim.trainer.loader
    pooled = torch.cat([sim.train_clients.get(c) for c in sim.schedule.cohort(1)])
    indices = pooled.repeat(-(-steps * cfg.client_config.batch_size // pooled.numel()))
    indices = indices[:steps * cfg.client_config.batch_size]
    generator = torch.Generator(device=sim.ctx.device).manual_seed(0)

    def run():
        model.train()
        for batch in loader.batches(indices, generator):
            batch = sim.trainer.prepare(batch)
            with torch.autocast(sim.ctx.device.type, dtype=torch.bfloat16, enabled=sim.trainer.bf16):
                loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return run


def main() -> None:
    parser = benchmark_parser(__doc__, "overhead", "cpu", repeats=5)
    args = parser.parse_args()
    cfg, sim = single_process_simulation(args.config, args.data, args.device, args.overrides)
    steps = sum(-(-int(sim.train_clients.sizes[c]) // cfg.client_config.batch_size) for c in sim.schedule.cohort(1)) \
        * cfg.client_config.local_epochs
    central_run = centralized_steps(sim, cfg, steps)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        rounds = iter(range(1, 10_000))
        fl, central = [], []
        for _ in range(args.repeats + 1):  # the first pair warms up and is dropped
            fl += timed(lambda: server._round(next(rounds)), sim.ctx.device, 1)
            central += timed(central_run, sim.ctx.device, 1)
        fl, central = fl[1:], central[1:]
        server.writer.close()
    result = {"benchmark": "overhead", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": args.device, "data": "synthetic" if args.data == "synthetic" else "cifar10",
              "config": args.config, "overrides": args.overrides, "cohort": sim.schedule.cohort_size(1),
              "steps_per_round": steps, "fl_round_s": median(fl), "centralized_s": median(central),
              "ratio": median(fl) / median(central), "fl_all": fl, "centralized_all": central}
    save(result, Path(args.out))


if __name__ == "__main__":
    main()
