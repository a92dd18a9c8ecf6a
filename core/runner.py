"""Run one experiment on this rank: build the simulation, then serve (rank 0, which also trains a share)
or work (ranks >= 1)."""
from __future__ import annotations

from pathlib import Path

import torch

from core.distributed import Transport, init_distributed
from core.errors import UserError
from core.server import Server
from core.simulation import build_simulation
from core.worker import run_worker


def run_experiment(cfg, task, data_path: str, run_dir: Path, backend: str, resume: Path | None, on_start=None):
    """Run the whole experiment; returns the evaluation records on rank 0, None elsewhere.

    ``on_start(sim)``, when given, runs on rank 0 once the simulation is built and before the server
    starts (e2e_trainer: refuse a checkpoint of another config or model, then record the run); a UserError
    from it stops every rank at once, as a server start error does.

    Raises:
        UserError: data, partition or model mistakes (before any round starts).
        PeerFailure: a peer process died or timed out during a collective.
    """
    ctx = init_distributed(backend, cfg.device, cfg.server_config.timeout_s)
    transport = Transport(ctx)
    try:
        sim = build_simulation(cfg, task, data_path, ctx, transport)
        history = _serve(sim, run_dir, resume, on_start) if ctx.rank == 0 else run_worker(sim)  # None on workers
    except BaseException as exc:  # SystemExit included: submitit exits this way on preemption
        transport.close(exc)
        raise
    transport.close()
    return history


def _serve(sim, run_dir: Path, resume: Path | None, on_start=None):
    """Rank 0: build the server and run it; if building fails (a missing checkpoint, say), tell the
    workers to stop (start round -1) before raising, so they do not wait for the timeout."""
    try:
        if on_start is not None:
            on_start(sim)
        server = Server(sim, run_dir, resume)
    except UserError:
        sim.transport.broadcast(torch.tensor([-1.0], device=sim.ctx.device), "start broadcast")
        raise
    return server.run()
