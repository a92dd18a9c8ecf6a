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
from core.worker import RoundLayout, train_share
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


def _mean_delta(lay, out) -> torch.Tensor:
    """The weighted mean delta of a reduce buffer (float32)."""
    delta_sum, weight_sum = lay.reduce_parts(out)[:2]
    return (delta_sum / weight_sum).float()


ROUNDING_MULTIPLE = 4  # vectorized vs sequential: at most this many times the round's measured rounding scale


def test_vectorized_round_equals_sequential(cifar_path):
    """One local epoch with momentum, Nesterov, weight decay, augmentation and uneven clients, each
    client starting from its own personal head: the vectorized round returns the sequential
    round's averaged delta and personal layers up to float32 rounding.

    The bound is ROUNDING_MULTIPLE times the float32 rounding scale of this very round on this
    machine: the largest change of the sequential round's result (averaged delta or personal
    layers) when its start is scaled by 1 +- 2^-20 (random signs, two draws). Float eps times the
    magnitudes (about 1e-6 here) would not do: training amplifies rounding through near-ties of
    ReLU and max-pool that a last-bit change flips, and each flip moves the result by a discrete
    jump. On a 2-core AMD EPYC, one-ulp changes of the start moved the averaged delta by 1.8e-4,
    4.2e-4 or 2.4e-3 and by nothing in between, and the vectorized round differs from the
    sequential one by 1.8e-4 there and by 4.0e-4 on another machine of that kind. Hence 2^-20 (8 to
    16 ulps) rather than one ulp: vectorizing reorders sums of 27 to 16,384 terms at every step,
    which changes each by about sqrt(terms) ulps, whereas a one-ulp start may flip no near-tie and
    measure 1e-6; from 2^-20 every draw flipped some (1.4e-3 to 5.3e-3 on the EPYC). The multiple
    4 leaves room for a vectorized round that flips more than the draws: the largest one-ulp change
    measured (2.7e-3) is about the smallest scale two of four draws gave (2.6e-3), a quarter of the
    bound that scale makes, and the bound stays below the bugs'.
    Measured on the EPYC: scale 5.3e-3, bound 2.1e-2, vectorized 1.8e-4 (averaged delta) and 1.6e-4
    (personal layers). Real bugs exceed the bound: a vectorized lr 2% too small differs by 3.9e-2
    (averaged delta), SGD without Nesterov by 0.14 (averaged delta), skipping the last step of one
    client by 8.2e-2 (personal layers). A missing weight decay (5e-4: 2.6e-3) is within this
    round's rounding and is not caught here. The weighted loss sums agree to 1e-4 relative (the
    2^-20 draws changed them by up to 1.9e-5).
    """
    seq, vec = _simulation(cifar_path, False), _simulation(cifar_path, True)
    sizes = seq.train_clients.sizes[seq.schedule.cohort(1)]
    assert len(set((s + 15) // 16 for s in sizes)) > 1 and any(s % 16 for s in sizes), \
        "the cohort should mix clients of different step counts and partial last batches"
    start = seq.layout.flatten()
    p = seq.personal_numel
    heads = start[seq.personal_index] + 0.1 * torch.randn(6, p, generator=torch.Generator().manual_seed(2))
    state = torch.cat([start, heads.reshape(-1)])
    go = torch.ones(1)  # the control value GO ends the broadcast
    a, b = train_share(seq, 1, torch.cat([state, go])), train_share(vec, 1, torch.cat([state, go]))
    lay = RoundLayout(seq, 1)
    assert lay.reduce_parts(a)[1] == lay.reduce_parts(b)[1] == float(sizes.sum())
    assert lay.reduce_parts(a)[0].abs().max() > 1.0, "clients really trained"
    assert lay.slots(a).shape == (6, p), "6 slots of p"
    assert not lay.dropped(a).any() and not lay.dropped(b).any(), "no client dropped"

    def parts(out):
        delta_sum, weight_sum, _, _, slots = lay.reduce_parts(out)
        return {"averaged delta": (delta_sum / weight_sum).float(), "personal layers": slots}

    def distances(x, y):
        return {name: float((u - parts(y)[name]).abs().max()) for name, u in parts(x).items()}

    scale = 0.0
    for seed in (1, 2):  # the replica is reset per client: the same simulation trains again
        signs = torch.randn(state.shape, generator=torch.Generator().manual_seed(seed)).sign()
        moved = train_share(seq, 1, torch.cat([state * (1 + signs * 2.0 ** -20), go]))
        scale = max(scale, *distances(a, moved).values())
    bound = ROUNDING_MULTIPLE * scale
    how = (f"bound {bound:.2g} (= {ROUNDING_MULTIPLE} x float32 rounding scale {scale:.2g}: the largest change of the "
           f"sequential round when its start is scaled by 1 +- 2^-20)")
    delta_max = float(parts(a)["averaged delta"].abs().max())
    assert bound < 0.2 * delta_max, f"{how} is not small next to the averaged delta (max |.| {delta_max:.2g})"
    for name, d in distances(b, a).items():
        assert d <= bound, f"max |vectorized - sequential| over the {name} = {d:.2g} > {how}"
    loss_a, loss_b = lay.reduce_parts(a)[2], lay.reduce_parts(b)[2]
    assert loss_b == pytest.approx(loss_a, rel=1e-4), f"weighted loss sum: vectorized {loss_b:.7g}, sequential {loss_a:.7g}"


def test_vectorized_fedprox_equals_sequential(cifar_path):
    """FedProx's proximal term (mu = 1) on the shared layers, plain SGD. The pull toward the global
    model damps rounding differences: measured 3e-8 apart on the Xeon guest (with momentum and
    Nesterov the same comparison drifts to 4e-4, as plain FedAvg does without the pull)."""
    prox = {"strategy": "fedprox", "strategy_config": {"mu": 1.0}}
    sgd = {"type": "sgd", "lr": 0.05}
    seq, vec = (_simulation(cifar_path, v, prox, optimizer_config=sgd) for v in (False, True))
    start, p = seq.layout.flatten(), seq.personal_numel
    heads = start[seq.personal_index] + 0.1 * torch.randn(6, p, generator=torch.Generator().manual_seed(2))
    buf = torch.cat([start, heads.reshape(-1), torch.ones(1)])
    a, b = train_share(seq, 1, buf.clone()), train_share(vec, 1, buf.clone())
    plain = train_share(_simulation(cifar_path, False, optimizer_config=sgd), 1, buf.clone())
    lay = RoundLayout(seq, 1)
    mean_a, mean_b, mean_plain = (_mean_delta(lay, out) for out in (a, b, plain))
    assert (mean_a - mean_b).abs().max() < 1e-4 and (lay.slots(a) - lay.slots(b)).abs().max() < 1e-4
    assert (mean_a - mean_plain).abs().max() > 1e-3, "the penalty changes the training (4.7e-3)"


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
    buf = torch.cat([vec.layout.flatten(), vec.layout.flatten()[vec.personal_index].repeat(6), torch.ones(1)])
    planned = train_share(vec, 1, buf.clone())
    sizes = vec.train_clients.sizes[vec.schedule.cohort(1)]
    assert sum(collated) == sum((s + 15) // 16 for s in sizes), "every client batch collated once"
    assert len(collated) < sum(collated) / 2, "one collate call per step and batch size, not per client"
    del loader.collate
    vec.vectorized.loader = PerClientBatches(loader)
    assert not vec.vectorized.loader.has_batch_plans
    stacked = train_share(vec, 1, buf.clone())
    assert RoundLayout(vec, 1).reduce_parts(planned)[0].abs().max() > 1.0, "clients really trained"
    assert torch.equal(planned, stacked)
