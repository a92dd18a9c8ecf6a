"""channels_last computes the same training as the default layout; bf16 autocast trains the same way."""
from __future__ import annotations

import torch

from core.worker import RoundLayout, train_share
from testing.test_vectorized import _simulation

PLAIN_SGD = {"optimizer_config": {"type": "sgd", "lr": 0.05}}


def _averaged_delta(sim) -> torch.Tensor:
    start = sim.layout.flatten()
    buf = torch.cat([start, start[sim.personal_index].repeat(6), torch.ones(1)])  # ends with GO
    out = train_share(sim, 1, buf)
    delta_sum, weight_sum = RoundLayout(sim, 1).reduce_parts(out)[:2]
    return (delta_sum / weight_sum).float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def test_channels_last_gradients_and_round_match_default_layout(cifar_path):
    base_sim = _simulation(cifar_path, False, **PLAIN_SGD)
    cl_sim = _simulation(cifar_path, False, channels_last=True, **PLAIN_SGD)
    assert cl_sim.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = next(base_sim.trainer.loader.batches(base_sim.train_clients.get(0)))
    for sim in (base_sim, cl_sim):
        sim.model.zero_grad()
        sim.model.loss(sim.trainer.prepare(batch)).backward()
    for p, q in zip(base_sim.model.parameters(), cl_sim.model.parameters()):
        assert _relative(p.grad, q.grad) < 1e-5, "one step: same gradients up to float rounding"
    # over a round, rounding differences grow through training, so the bound is looser
    # (a layout bug would show as O(1) differences; rounding alone stays near 1e-3)
    assert _relative(_averaged_delta(base_sim), _averaged_delta(cl_sim)) < 1e-2


def test_bf16_autocast_follows_fp32_training(cifar_path):
    base = _averaged_delta(_simulation(cifar_path, False))
    bf16 = _averaged_delta(_simulation(cifar_path, False, precision="bf16"))
    assert not torch.equal(base, bf16), "bf16 autocast changes the arithmetic"
    cosine = torch.nn.functional.cosine_similarity(base, bf16, dim=0)
    assert cosine > 0.9, f"bf16 update points elsewhere (cosine {cosine:.3f})"
