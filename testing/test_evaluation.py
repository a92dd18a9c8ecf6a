"""Evaluation batched across clients equals client-by-client evaluation."""
from __future__ import annotations

import numpy as np
import torch

from core.evaluation import batched_correct, client_stats, correct_count
from testing.test_vectorized import _simulation


def test_batched_global_evaluation_matches_per_client(cifar_path):
    sim = _simulation(cifar_path, False)
    sim.trainer.load(sim.layout.flatten(), None)
    clients = np.array([0, 3, 7, 11, 42, 199])
    batched = batched_correct(sim.model, sim.test_loader, clients, sim.test_clients, sim.trainer.prepare)
    single = torch.stack([correct_count(sim.model, sim.test_loader, sim.test_clients.get(c)) for c in clients])
    assert torch.equal(batched, single)
    assert batched.sum() > 0 and (batched <= torch.as_tensor(sim.test_clients.sizes[clients])).all()


def test_client_stats():
    stats = client_stats(np.array([0.2, 0.4, 1.0]), np.array([1, 1, 2]))
    assert stats["weighted_mean"] == 0.65 and abs(stats["mean"] - 1.6 / 3) < 1e-12
    assert stats["clients"] == 3 and stats["p50"] == 0.4
