"""On a CUDA device: a round's training never makes the host wait for the GPU, and CUDA graphs replay.

A host-device synchronization (``.item()``, a blocking host-to-device copy, a D2H ``.cpu()``) inside
the client loop empties the launch queue, and small-batch rounds are launch-bound. CUDA's sync debug
mode raises on any such call. Skipped without a GPU (CI runs on a CPU); run it on a GPU machine.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.common import single_process_simulation
from core.config import load_config
from core.distributed import DistContext, Transport
from core.simulation import build_simulation
from core.task import load_task
from core.worker import RoundLayout, train_share
from testing.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _round_buffer(sim, round_idx: int) -> torch.Tensor:
    """A broadcast buffer: the global state, then each cohort client's slot from the global values."""
    lay = RoundLayout(sim, round_idx)
    flat = sim.layout.flatten()
    slot = flat[sim.personal_index]
    return torch.cat([flat, torch.zeros(lay.s, device=flat.device), slot.repeat(lay.k), torch.ones(1, device=flat.device)])


@pytest.mark.parametrize("overrides", [[], ["client_config.vectorize=true", "client_config.vectorize_chunk=3"],
                                       ["strategy=dga"]], ids=["sequential", "vectorized", "dga"])
def test_training_a_share_never_synchronizes(overrides):
    cfg = load_config(REPO / "experiments/synthetic/config.yaml",
                      ["device=cuda", "client_config.optimizer_config.momentum=0.9"] + overrides)
    ctx = DistContext(0, 1, torch.device("cuda"), "gloo")
    _assert_share_never_synchronizes(build_simulation(cfg, load_task("synthetic"), "unused", ctx, Transport(ctx)))


@pytest.mark.parametrize("overrides", [[], ["client_config.vectorize=true"]], ids=["sequential", "vectorized"])
def test_cifar_workload_share_never_synchronizes(overrides):
    """The cv task's loader on the device (random crops and flips from the client's generator), and
    PflCNN's dropout, on the benchmarks' workload of item 1 (random CIFAR-shaped images)."""
    _, sim = single_process_simulation("benchmarks/configs/pfl_cnn_50x50.yaml", "synthetic", "cuda",
                                       ["client_config.augment=true", "client_config.optimizer_config.momentum=0.9"]
                                       + overrides)
    _assert_share_never_synchronizes(sim)


def _assert_share_never_synchronizes(sim) -> None:
    """Round 2's share of training runs under CUDA's sync debug mode ``error``."""
    train_share(sim, 1, _round_buffer(sim, 1))  # first use: lazy CUDA initialisation may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = train_share(sim, 2, _round_buffer(sim, 2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert RoundLayout(sim, 2).reduce_parts(out)[1] > 0, "the clients trained"


def test_cuda_graph_replays_train_what_eager_training_does():
    """``compile_mode: reduce-overhead`` replays CUDA graphs, and each replay reuses the memory of the
    previous step's outputs; the engine keeps every step's loss until its client ends. Three rounds
    (capture, then replays across steps, clients and batch sizes) give eager training's delta sums."""
    buffers = []
    for extra in ([], ["client_config.compile=true", "client_config.compile_mode=reduce-overhead"]):
        cfg = load_config(REPO / "experiments/synthetic/config.yaml", ["device=cuda"] + extra)
        ctx = DistContext(0, 1, torch.device("cuda"), "gloo")
        sim = build_simulation(cfg, load_task("synthetic"), "unused", ctx, Transport(ctx))
        buffers.append([RoundLayout(sim, r).reduce_parts(train_share(sim, r, _round_buffer(sim, r)))[0] for r in (1, 2, 3)])
    for eager, graphs in zip(*buffers):
        assert torch.isfinite(graphs).all()
        assert float((graphs - eager).norm() / eager.norm()) < 1e-3, "compiled summation order differs only"
