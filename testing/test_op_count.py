"""The client loop launches nothing per step beyond the training step itself.

On a GPU with small batches every dispatched operator costs a kernel launch, and a host sync
(``.item()``) stalls the queue. So the loop's bookkeeping (loss sums, weights, resets) must cost a
constant per client, never something per step. Operator counts are exact, so this is no timing test.
"""
from __future__ import annotations

import torch

from core.config import load_config
from core.distributed import DistContext, Transport
from core.simulation import build_simulation
from core.task import load_task
from testing.conftest import REPO
from utils.op_count import count_ops


def _synthetic_sim():
    cfg = load_config(REPO / "experiments/synthetic/config.yaml",
                      ["client_config.optimizer_config.momentum=0.9", "personalization.method=none",
                       "personalization.local_layers=[]"])
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    return build_simulation(cfg, load_task("synthetic"), "unused", ctx, Transport(ctx))


def test_client_training_adds_no_operator_per_step():
    sim = _synthetic_sim()
    trainer, batch_size = sim.trainer, sim.cfg.client_config.batch_size
    start = sim.layout.flatten()

    def client(steps: int):
        indices = torch.arange(steps * batch_size)
        return count_ops(lambda: trainer.train(1, 0, indices, start, None))

    def bare(steps: int):
        """The training steps alone: what centralized training at this batch size dispatches."""
        def run():
            trainer.optimizer.state.clear()
            for batch in trainer.loader.batches(torch.arange(steps * batch_size), torch.Generator().manual_seed(0)):
                loss = trainer.model.loss(batch)
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer.optimizer.step()
        return count_ops(run)

    short, long = client(2), client(7)
    assert trainer.last_steps == 7
    per_step = (long.computing() - short.computing()) / 5
    bare_per_step = (bare(7).computing() - bare(2).computing()) / 5
    assert bare_per_step > 10, "a step does dispatch operators (forward, backward, SGD)"
    assert per_step == bare_per_step, "the client loop adds operators at every step"
    assert long.ops["_local_scalar_dense"] == 0, "no host sync (.item()) inside client training"
    assert long.computing() - 7 * bare_per_step < 12, "a handful of operators per client"
