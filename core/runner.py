"""Run one experiment on this rank: build the simulation, then serve (rank 0, which also trains a share)
or work (ranks >= 1)."""
from __future__ import annotations

from pathlib import Path

from core.distributed import Transport, init_distributed
from core.server import Server
from core.simulation import build_simulation
from core.worker import run_worker


def run_experiment(cfg, task, data_path: str, run_dir: Path, backend: str, resume: Path | None):
    """Run the whole experiment; returns the evaluation records on rank 0, None elsewhere.

    Raises:
        UserError: data, partition or model mistakes (before any round starts).
        PeerFailure: a peer process died or timed out during a collective.
    """
    ctx = init_distributed(backend, cfg.device, cfg.server_config.timeout_s)
    transport = Transport(ctx)
    try:
        sim = build_simulation(cfg, task, data_path, ctx, transport)
        if ctx.rank == 0:
            return Server(sim, run_dir, resume).run()
        run_worker(sim)
        return None
    finally:
        transport.close()
