"""Vectorized client training (torch.func vmap) equals sequential training for SGD."""
from __future__ import annotations

import pytest
import torch

from benchmarks.dispatch import PerClientBatches
from core.config import validate_config
from core.distributed import DistContext, Transport
from core.errors import UserError
from core.simulation import build_simulation
from core.task import load_task
from core.worker import train_share
from testing.conftest import SMALL_CV


def _simulation(cifar_path, vectorize: bool, strategy: dict | None = None, **client):
    config = {**SMALL_CV, **(strategy or {}),
              "server_config": {**SMALL_CV["server_config"], "num_clients_per_iteration": 6},
              "client_config": {**SMALL_CV["client_config"], "batch_size": 16, "local_epochs": 1,
                                "vectorize": vectorize, "vectorize_chunk": 4,
                                "optimizer_config": {"type": "sgd", "lr": 0.05, "momentum": 0.9,
                                                     "weight_decay": 5e-4, "nesterov": True}, **client},
              "data_config": {**SMALL_CV["data_config"], "num_clients": 200}}
    cfg = validate_config(config, "test")
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    return build_simulation(cfg, load_task("cv"), str(cifar_path), ctx, Transport(ctx))


def test_vectorized_round_equals_sequential(cifar_path):
    """One local epoch with momentum, Nesterov, weight decay, augmentation and uneven clients, each
    client starting from its own personal head.

    The bound is float rounding, measured: how far sequential training moves when its start is
    perturbed by 1e-7 relative noise. On most CPUs both differences stay below 1e-4; on a 2-core
    AMD EPYC (Zen 1, AVX2) any rounding change flips the same few activations and both differences
    are 1.3e-3 (0.6% of the delta's norm). A vectorization bug (wrong data order, momentum, client
    mix-up) moves the delta by far more.
    """
    seq, vec = _simulation(cifar_path, False), _simulation(cifar_path, True)
    sizes = seq.train_clients.sizes[seq.schedule.cohort(1)]
    assert len(set((s + 15) // 16 for s in sizes)) > 1 and any(s % 16 for s in sizes), \
        "the cohort should mix clients of different step counts and partial last batches"
    start = seq.layout.flatten()
    p = seq.personal_numel
    heads = start[seq.personal_index] + 0.1 * torch.randn(6, p, generator=torch.Generator().manual_seed(2))
    buf = torch.cat([start, heads.reshape(-1)])
    a, b = train_share(seq, 1, buf.clone()), train_share(vec, 1, buf.clone())
    noise = 1 + 1e-7 * torch.randn(buf.shape, generator=torch.Generator().manual_seed(1))
    c = train_share(seq, 1, buf * noise)  # the replica is reset per client: the same sim trains again
    n = seq.layout.numel
    assert a[n] == b[n] == float(sizes.sum())
    assert a[:n].abs().max() > 1.0, "clients really trained"

    def averaged(out):
        return out[:n] / out[n]
    rounding = max(1e-4, 2 * float((averaged(a) - averaged(c)).abs().max()))
    assert rounding < 1e-2, "sequential training itself should not be this sensitive to rounding"
    assert (averaged(a) - averaged(b)).abs().max() < rounding, "same averaged delta"
    assert a[n + 2:].numel() == 6 * p > 0
    personal_rounding = max(1e-4, 2 * float((a[n + 2:] - c[n + 2:]).abs().max()))
    assert (a[n + 2:] - b[n + 2:]).abs().max() < personal_rounding, "same personal layers"
    assert torch.allclose(a[n + 1], b[n + 1], rtol=1e-4), "same weighted loss"


def test_vectorized_fedprox_equals_sequential(cifar_path):
    """FedProx's proximal term (mu = 1) on the shared layers, plain SGD. The pull toward the global
    model damps rounding differences: measured 3e-8 apart on the Xeon guest (with momentum and
    Nesterov the same comparison drifts to 4e-4, as plain FedAvg does without the pull)."""
    prox = {"strategy": "fedprox", "strategy_config": {"mu": 1.0}}
    sgd = {"type": "sgd", "lr": 0.05}
    seq, vec = (_simulation(cifar_path, v, prox, optimizer_config=sgd) for v in (False, True))
    start, p, n = seq.layout.flatten(), seq.personal_numel, seq.layout.numel
    heads = start[seq.personal_index] + 0.1 * torch.randn(6, p, generator=torch.Generator().manual_seed(2))
    buf = torch.cat([start, heads.reshape(-1)])
    a, b = train_share(seq, 1, buf.clone()), train_share(vec, 1, buf.clone())
    plain = train_share(_simulation(cifar_path, False, optimizer_config=sgd), 1, buf.clone())
    assert (a[:n] / a[n] - b[:n] / b[n]).abs().max() < 1e-4 and (a[n + 2:] - b[n + 2:]).abs().max() < 1e-4
    assert (a[:n] / a[n] - plain[:n] / plain[n]).abs().max() > 1e-3, "the penalty changes the training (4.7e-3)"


def test_vectorize_refuses_batchnorm_and_adam(cifar_path):
    with pytest.raises(UserError, match="BatchNorm"):
        config = {**SMALL_CV, "model_config": {"model_type": "ResNet18"},
                  "client_config": {**SMALL_CV["client_config"], "vectorize": True}}
        cfg = validate_config(config, "test")
        ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
        build_simulation(cfg, load_task("cv"), str(cifar_path), ctx, Transport(ctx))
    with pytest.raises(UserError, match="sgd only"):
        _simulation(cifar_path, True, optimizer_config={"type": "adam", "lr": 0.001})


def test_vectorized_loaders_with_and_without_batch_plans_train_alike(cifar_path):
    """With batch plans the batches of a step come from one ``collate`` call for all clients;
    a loader with ``batches`` only is stacked client by client. Both give the same training, bit for bit."""
    vec = _simulation(cifar_path, True)
    loader = vec.vectorized.loader
    assert loader.has_batch_plans
    collated = []
    loader.collate = lambda plans: collated.append(len(plans)) or type(loader).collate(loader, plans)
    buf = torch.cat([vec.layout.flatten(), vec.layout.flatten()[vec.personal_index].repeat(6)])
    planned = train_share(vec, 1, buf.clone())
    sizes = vec.train_clients.sizes[vec.schedule.cohort(1)]
    assert sum(collated) == sum((s + 15) // 16 for s in sizes), "every client batch collated once"
    assert len(collated) < sum(collated) / 2, "one collate call per step and batch size, not per client"
    del loader.collate
    vec.vectorized.loader = PerClientBatches(loader)
    assert not vec.vectorized.loader.has_batch_plans
    stacked = train_share(vec, 1, buf.clone())
    assert planned[:vec.layout.numel].abs().max() > 1.0, "clients really trained"
    assert torch.equal(planned, stacked)
