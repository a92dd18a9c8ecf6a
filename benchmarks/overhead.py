"""Item 1: simulation overhead. One FL round vs centralized training doing the same optimizer steps.

The FL round is the engine's real round (cohort sampling, broadcast/reduce buffers, per-client reset
of the one replica, local training, weighted delta sums, server step). The centralized baseline trains
a model of the same class for the same number of steps at the same batch size, with the same loader
and optimizer (and the same ``precision`` / ``channels_last`` / ``compile`` switches). The two are timed
alternately, one FL round then one centralized pass, so that drift in the machine's load hits both.
Ratio = median FL round seconds / median centralized seconds (1.00 = no overhead); the median of the
per-pair ratios is saved too. Each centralized pass starts from the global weights of the FL round
it is paired with.

    python benchmarks/overhead.py --device cpu --data ../shared/data/cifar10
    python benchmarks/overhead.py --device cuda --data synthetic
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import benchmark_parser, machine, median, save, single_process_simulation, timed
from core.flat import StateLayout
from core.model import training_loss
from core.optim import build_optimizer
from core.server import Server


def centralized_steps(sim, cfg, steps: int):
    """A closure ``run(start)`` that sets a second model of the same class to the flat state
    ``start`` (not timed: call it outside the clock) and returns a closure training it for ``steps``
    batches of the client batch size, on the samples of round 1's cohort pooled together (the same
    images the FL round reads).

    Starting every pass from the FL round's global weights matters on the CPU: the cost of an
    NCHW max-pool forward depends on the values it compares (2.4 ms on random activations vs 0.8 ms
    when 98% are zero for a (10, 64, 28, 28) input, branch mispredictions), so a model trained
    for many more steps than the global model runs measurably faster steps.
    """
    model = type(sim.model)(cfg.model).to(sim.ctx.device)
    if cfg.client_config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.client_config.optimizer_config)
    loss_fn = training_loss(model, cfg.client_config)  # compiled too when client_config.compile is on
    loader = sim.trainer.loader
    pooled = torch.cat([sim.train_clients.get(c) for c in sim.schedule.cohort(1)])
    indices = pooled.repeat(-(-steps * cfg.client_config.batch_size // pooled.numel()))
    indices = indices[:steps * cfg.client_config.batch_size]
    generator = torch.Generator(device=sim.ctx.device).manual_seed(0)
    layout = StateLayout(model)

    def start(flat: torch.Tensor):
        layout.load_(flat)
        return run

    def run():
        model.train()
        for batch in loader.batches(indices, generator):
            batch = sim.trainer.prepare(batch)
            with torch.autocast(sim.ctx.device.type, dtype=torch.bfloat16, enabled=sim.trainer.bf16):
                loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return start


def main() -> None:
    parser = benchmark_parser(__doc__, "overhead", "cpu", repeats=5)
    args = parser.parse_args()
    cfg, sim = single_process_simulation(args.config, args.data, args.device, args.overrides)
    steps = sum(-(-int(sim.train_clients.sizes[c]) // cfg.client_config.batch_size) for c in sim.schedule.cohort(1)) \
        * cfg.client_config.local_epochs
    central_from = centralized_steps(sim, cfg, steps)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        rounds = iter(range(1, 10_000))
        fl, central = [], []
        for _ in range(args.repeats + 1):  # the first pair warms up and is dropped
            central_run = central_from(server.global_flat)  # the weights this round starts from
            fl += timed(lambda: server._round(next(rounds)), sim.ctx.device, 1)
            central += timed(central_run, sim.ctx.device, 1)
        fl, central = fl[1:], central[1:]
        server.writer.close()
    result = {"benchmark": "overhead", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": args.device, "data": "synthetic" if args.data == "synthetic" else "cifar10",
              "config": args.config, "overrides": args.overrides, "centralized_start": "round's global weights", "cohort": sim.schedule.cohort_size(1),
              "steps_per_round": steps, "fl_round_s": median(fl), "centralized_s": median(central),
              "ratio": median(fl) / median(central),
              "pair_ratio_median": median([a / b for a, b in zip(fl, central)]), "fl_all": fl, "centralized_all": central}
    save(result, Path(args.out))


if __name__ == "__main__":
    main()
