"""Item 1: simulation overhead. One FL round vs centralized training doing the same optimizer steps.

The FL round is the engine's real round (cohort sampling, broadcast/reduce buffers, per-client reset
of the one replica, local training, weighted delta sums, server step). The centralized baseline trains
a model of the same class for the same number of steps at the same batch size, with the same loader
and optimizer (and the same ``precision`` / ``channels_last`` / ``compile`` switches). The two are timed
alternately, one FL round then one centralized pass, so that drift in the machine's load hits both.
Ratio = median FL round seconds / median centralized seconds (1.00 = no overhead); the median of the
per-pair ratios is saved too. Each centralized pass starts from the global weights of the FL round
it is paired with. ``--breakdown N`` rounds follow the pairs, with the clients' step loops timed
apart (``breakdown`` in the record): the share of a round spent outside local training.

    python benchmarks/overhead.py --device cpu --data ../shared/data/cifar10
    python benchmarks/overhead.py --device cuda --data synthetic
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import CallClock, benchmark_parser, machine, median, save, single_process_simulation, timed
from core.flat import StateLayout
from core.model import training_loss
from core.optim import build_optimizer
from core.server import Server


def round_steps(sim, cfg, round_idx: int) -> int:
    """Optimizer steps of round ``round_idx``: each cohort client's batches times the local epochs."""
    batch = cfg.client_config.batch_size
    return sum(-(-int(sim.train_clients.sizes[c]) // batch) for c in sim.schedule.cohort(round_idx)) \
        * cfg.client_config.local_epochs


def centralized_steps(sim, cfg, steps: int | None = None):
    """A closure ``start(flat, round_idx)`` that sets a second model of the same class to the flat
    state ``flat`` (not timed: call it outside the clock) and returns a closure training it for
    ``steps`` batches (default: the steps of round ``round_idx``) of the client batch size, on the
    samples of that round's cohort pooled together (the images the paired FL round reads).

    Starting every pass from the FL round's global weights, on its cohort's images, matters on the
    CPU: the cost of an NCHW max-pool forward depends on the values it compares (2.4 ms on random
    activations vs 0.8 ms when 98% are zero for a (10, 64, 28, 28) input, branch mispredictions),
    so a model trained for many more steps than the global model runs measurably faster steps.
    """
    model = type(sim.model)(cfg.model).to(sim.ctx.device)
    if cfg.client_config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.client_config.optimizer_config)
    loss_fn = training_loss(model, cfg.client_config)  # compiled too when client_config.compile is on
    loader = sim.trainer.loader
    generator = torch.Generator(device=sim.ctx.device).manual_seed(0)
    layout = StateLayout(model)

    def start(flat: torch.Tensor, round_idx: int):
        layout.load_(flat)
        pooled = torch.cat([sim.train_clients.get(c) for c in sim.schedule.cohort(round_idx)])
        size = (steps or round_steps(sim, cfg, round_idx)) * cfg.client_config.batch_size
        indices = pooled.repeat(-(-size // pooled.numel()))[:size]
        return lambda: run(indices)

    def run(indices: torch.Tensor):
        model.train()
        for batch in loader.batches(indices, generator):
            batch = sim.trainer.prepare(batch)
            with torch.autocast(sim.ctx.device.type, dtype=torch.bfloat16, enabled=sim.trainer.bf16):
                loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return start


def outside_steps(server, sim, rounds: range) -> dict:
    """Diagnostic rounds after the timed pairs: each round's seconds and the seconds inside the
    clients' local-training step loops (``ClientTrainer._epochs``; with ``vectorize`` on, each
    group's ``VectorizedTrainer.train_group``), synchronised around every call, so these rounds are
    not timed pairs. What remains is the simulation's own cost per round: the per-client reset and
    weighted read-back, the server step and the Python around them."""
    trainer, method = (sim.vectorized, "train_group") if sim.vectorized is not None else (sim.trainer, "_epochs")
    round_s, steps_s = [], []
    with CallClock(trainer, method, sim.ctx.device) as clock:
        for r in rounds:
            clock.seconds = 0.0
            round_s += timed(lambda: server._round(r), sim.ctx.device, 1)
            steps_s.append(clock.seconds)
    return {"rounds": list(rounds), "clocked": f"{type(trainer).__name__}.{method}", "round_s": round_s, "steps_s": steps_s,
            "outside_steps_s_median": median([a - b for a, b in zip(round_s, steps_s)]),
            "outside_steps_share_median": median([(a - b) / a for a, b in zip(round_s, steps_s)])}


def main() -> None:
    parser = benchmark_parser(__doc__, "overhead", "cpu", repeats=5)
    parser.add_argument("--breakdown", type=int, default=3,
                        help="diagnostic rounds after the pairs, timing the clients' step loops apart (0: none)")
    args = parser.parse_args()
    cfg, sim = single_process_simulation(args.config, args.data, args.device, args.overrides)
    central_from = centralized_steps(sim, cfg)
    rounds = range(1, args.repeats + 2)  # the first pair warms up and is dropped
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        fl, central = [], []
        for r in rounds:
            central_run = central_from(server.global_flat, r)  # the weights and cohort of round r
            fl += timed(lambda: server._round(r), sim.ctx.device, 1)
            central += timed(central_run, sim.ctx.device, 1)
        fl, central = fl[1:], central[1:]
        breakdown = outside_steps(server, sim, range(rounds[-1] + 1, rounds[-1] + 1 + args.breakdown)) \
            if args.breakdown else None
        server.close()
    result = {"benchmark": "overhead", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": args.device, "data": "synthetic" if args.data == "synthetic" else "cifar10",
              "config": args.config, "overrides": args.overrides, "centralized_start": "round's global weights",
              "centralized_data": "round's cohort", "cohort": sim.schedule.cohort_size(1),
              "steps_per_round": [round_steps(sim, cfg, r) for r in rounds][1:], "fl_round_s": median(fl), "centralized_s": median(central),
              "ratio": median(fl) / median(central),
              "pair_ratio_median": median([a / b for a, b in zip(fl, central)]), "fl_all": fl, "centralized_all": central,
              "breakdown": breakdown}
    save(result, Path(args.out))


if __name__ == "__main__":
    main()
