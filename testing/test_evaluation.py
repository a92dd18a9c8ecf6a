"""Evaluation batched across clients equals client-by-client evaluation; the full-test accuracy taken
from the clients' splits equals a pass over the whole test set."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.evaluation import (batched_counts, client_stats, eval_width, full_test_accuracy, global_test_accuracy,
                             share_of_evaluation)
from core.evaluation import test_counts as counts_of  # not collected as a test
from core.simulation import ClientIndex
from testing.test_vectorized import _simulation


@pytest.fixture(scope="module")
def sim(cifar_path):
    return _simulation(cifar_path, False)


def test_batched_global_evaluation_matches_per_client(sim):
    sim.trainer.load(sim.layout.flatten(), None)
    clients = np.array([0, 3, 7, 11, 42, 199])
    batched = batched_counts(sim.model, sim.test_loader, clients, sim.test_clients, sim.trainer.prepare)
    single = torch.stack([counts_of(sim.model, sim.test_loader, sim.test_clients.get(c)) for c in clients])
    assert torch.equal(batched, single)
    correct = batched[:, 0]
    assert correct.sum() > 0 and (correct <= torch.as_tensor(sim.test_clients.sizes[clients])).all()


def test_client_stats():
    stats = client_stats(np.array([0.2, 0.4, 1.0]), np.array([1, 1, 2]))
    assert stats["weighted_mean"] == 0.65 and abs(stats["mean"] - 1.6 / 3) < 1e-12
    assert stats["clients"] == 3 and stats["p50"] == 0.4
    # spread over clients, unweighted: population std, percentiles interpolated between the clients
    assert stats["std"] == pytest.approx(0.339935, abs=1e-6)
    assert stats["p10"] == pytest.approx(0.24) and stats["p90"] == pytest.approx(0.88)


def test_full_test_accuracy_from_the_client_splits_equals_its_own_pass(sim):
    num_test = len(sim.test_loader.dataset.labels)
    parts = [sim.test_clients.get(c).numpy() for c in range(len(sim.test_clients.sizes))]
    assert sim.test_clients.partitions(num_test)
    flat = sim.layout.flatten()
    flat += 0.05 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(0))  # predicts several classes
    matrix = share_of_evaluation(sim, 1, flat, torch.zeros(0, eval_width(sim)), []).double().numpy()
    full = full_test_accuracy(sim, flat)
    assert 0.02 < full < 0.5 and global_test_accuracy(sim, flat, matrix) == full
    # a task's own split plan that leaves samples out, repeats one or names one past the end
    for broken in (parts[1:], parts + [parts[0][:1]], [np.concatenate([parts[0][1:], [num_test]])] + parts[1:]):
        assert not ClientIndex(broken, torch.device("cpu")).partitions(num_test)
    partial = dataclasses.replace(sim, test_clients=ClientIndex(parts[1:], torch.device("cpu")))
    assert global_test_accuracy(partial, flat, np.zeros_like(matrix)) == full  # its own pass, not the matrix


def test_global_model_of_a_head_split_method_carries_the_clients_mean_head(tmp_path):
    """FedPer on the synthetic task: the global model evaluation reports is the aggregated body with,
    as its head, the train-sample-weighted mean of the trained clients' own heads, rebuilt here in
    float64 from the checkpoint's client store and the partition's train sizes; the aggregated
    global model's head itself never trains and keeps its initial weights (the old "global" number)."""
    from testing.conftest import load_ckpt, read_metrics, run_trainer
    from utils.experiment import Experiment

    proc = run_trainer(["-dataPath", "unused", "-outputPath", str(tmp_path), "-config", "experiments/synthetic/config.yaml",
                        "-task", "synthetic", "-run_name", "fedper", "--set", "server_config.max_iteration=4",
                        "--set", "server_config.val_freq=4", "--set", "server_config.ckpt_freq=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record, state = read_metrics(tmp_path / "fedper")[-1], load_ckpt(tmp_path / "fedper")
    assert state["round"] == record["round"] == 4
    exp = Experiment(tmp_path / "fedper", task="synthetic", data_path="unused")
    sim = exp.simulation()
    head = sim.personal_index
    entries = state["client_store"]["entries"]
    trained = sorted(int(c) for c in sim.schedule.trained_through(4))
    assert trained and sorted(entries) == trained
    sizes = np.array([sim.train_clients.sizes[c] for c in trained], dtype=np.float64)
    heads = np.stack([entries[c][:len(head)].double().numpy() for c in trained])
    mean_head = torch.from_numpy(sizes @ heads / sizes.sum()).float()
    expected = state["global"].clone()
    expected[head] = mean_head
    assert float((state["evaluated_personal"] - mean_head).abs().max()) <= 1e-6
    assert record["global_test_acc"] == full_test_accuracy(sim, expected)
    initial = full_test_accuracy(sim, state["global"])  # the untrained head: what used to be reported
    assert initial != record["global_test_acc"], initial
    assert "mean of" in record["global_model"] and f"{len(trained)} trained clients" in record["global_model"]
    assert "global (personal layers: clients' mean) test" in proc.stdout
    assert "The global model: shared layers as aggregated" in (tmp_path / "fedper" / "summary.md").read_text()
    reloaded, _, _ = exp.evaluate("last")
    assert reloaded["global_test_acc"] == record["global_test_acc"] and reloaded["global_model"] == record["global_model"]
