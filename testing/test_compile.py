"""client_config.compile: local training through torch.compile computes what eager training does."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from core.errors import UserError
from testing.test_precision import PLAIN_SGD, _averaged_delta, _relative
from testing.test_vectorized import _simulation


def test_compiled_local_training_matches_eager(cifar_path):
    """SmallCNN (no dropout: compiled code draws random numbers its own way), plain SGD; one step,
    then one local epoch of 6 clients with partial last batches (a second batch size).

    The mode is ``reduce-overhead``, which on a CPU compiles as ``default`` does (no CUDA graphs)
    and also runs the loss copy the CUDA-graph modes need (test_gpu.py replays the graphs)."""
    torch._dynamo.reset()
    counters.clear()
    eager_sim = _simulation(cifar_path, False, **PLAIN_SGD)
    sim = _simulation(cifar_path, False, compile=True, compile_mode="reduce-overhead", **PLAIN_SGD)
    assert eager_sim.trainer.loss == eager_sim.model.loss, "compile is off by default"
    batch = next(eager_sim.trainer.loader.batches(eager_sim.train_clients.get(0)))
    for s in (eager_sim, sim):
        s.model.zero_grad()
        s.trainer.loss(batch).backward()
    assert counters["stats"]["unique_graphs"] >= 1, "the client loss really went through torch.compile"
    for p, q in zip(eager_sim.model.parameters(), sim.model.parameters()):
        assert _relative(p.grad, q.grad) < 1e-5, "one step: same gradients up to float rounding"
    # over a round the compiled graph sums in another order and the difference grows through
    # training to about 1e-3; a stale parameter or a missed in-place reset shows as O(1)
    eager, compiled = _averaged_delta(eager_sim), _averaged_delta(sim)
    assert eager.abs().max() > 1e-3, "clients really trained"
    assert _relative(eager, compiled) < 1e-2


def test_compile_with_vectorize_is_refused(cifar_path):
    with pytest.raises(UserError, match="compile: false or vectorize: false"):
        _simulation(cifar_path, True, compile=True)
