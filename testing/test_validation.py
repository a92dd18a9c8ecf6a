"""Validation splits (``data_config.val_fraction``) and the checkpoint they choose (``best.pt``).

Issue 23: best.pt used to be the evaluation with the highest global test accuracy, so every figure
read from it was selected on the data it was reported on.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.partition import carve_validation, dirichlet
from testing.conftest import load_ckpt, read_metrics, run_trainer

SYNTHETIC = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic",
             "--set", "server_config.max_iteration=8", "--set", "server_config.val_freq=1"]


def test_carve_keeps_each_clients_label_mix_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    parts = dirichlet(labels, 30, 0.3, seed=1, min_samples=5)
    train, val = carve_validation(parts, labels, 0.2, seed=7)
    for part, t, v in zip(parts, train, val):
        assert len(np.intersect1d(t, v)) == 0 and np.array_equal(np.sort(np.concatenate([t, v])), np.sort(part))
        assert len(v) == min(round(0.2 * len(part)), len(part) - 1) and len(t) >= 1
        own = np.bincount(labels[part], minlength=10) / len(part)
        held = np.bincount(labels[v], minlength=10)
        # largest remainder: each class within one sample of its share of the validation split
        assert np.all(np.abs(held - own * len(v)) < 1 + 1e-9), (held, own * len(v))
    again, other = carve_validation(parts, labels, 0.2, seed=7), carve_validation(parts, labels, 0.2, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(val, again[1]))
    assert any(not np.array_equal(a, b) for a, b in zip(val, other[1]))
    single, _ = carve_validation([np.array([3])], labels, 0.5, seed=0)
    assert single[0].tolist() == [3], "a one-sample client keeps its sample for training"


def _accuracy_on(sim, flat: torch.Tensor, clients) -> tuple[float, float]:
    """Sample-weighted accuracy and mean loss of the model ``flat`` on ``clients``' validation splits,
    computed batch by batch here."""
    sim.layout.load_(flat)
    sim.model.eval()
    correct = loss = count = 0.0
    with torch.no_grad():
        for c in clients:
            for batch in sim.val_loader.batches(sim.val_clients.get(c)):
                out = sim.model(batch["x"])
                correct += float((out.argmax(1) == batch["y"]).sum())
                loss += float(torch.nn.functional.cross_entropy(out, batch["y"], reduction="sum"))
                count += len(batch["y"])
    return correct / count, loss / count


def test_best_is_chosen_on_validation_and_validation_is_not_trained_on(tmp_path):
    proc = run_trainer([*SYNTHETIC, "-outputPath", str(tmp_path), "-run_name", "v",
                        "--set", "data_config.val_fraction=0.2", "--set", "personalization.method=none",
                        "--set", "personalization.local_layers=[]", "--set", "client_config.optimizer_config.lr=0.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = read_metrics(tmp_path / "v")
    val = [r["val"]["global"]["weighted_mean"] for r in history]
    chosen = history[int(np.argmax(val))]["round"]  # first of the highest, as a strict ">" keeps
    assert history[-1]["best"] == {"metric": "val_global_acc", "round": chosen, "value": max(val)}
    assert load_ckpt(tmp_path / "v", "best")["round"] == chosen
    summary = (tmp_path / "v" / "summary.md").read_text()
    assert f"checkpoints/best.pt is round {chosen}, chosen by validation accuracy of the global model" in summary
    assert "chosen on the test set" not in summary

    from utils.experiment import Experiment
    exp = Experiment(tmp_path / "v", task="synthetic", data_path="unused")
    sim = exp.simulation()
    plan = sim.train_clients, sim.val_clients
    full = exp.task.dataset_cls("unused", exp.config.data_config, split="train", seed=exp.config.seed).split_plan.train
    for c in range(len(full)):
        t, v = plan[0].get(c).numpy(), plan[1].get(c).numpy()
        assert len(np.intersect1d(t, v)) == 0 and np.array_equal(np.sort(np.concatenate([t, v])), np.sort(full[c]))
    state = load_ckpt(tmp_path / "v", "latest")
    acc, loss = _accuracy_on(sim, state["global"], range(len(full)))
    assert history[-1]["val"]["global"]["weighted_mean"] == pytest.approx(acc, abs=1e-9)
    assert history[-1]["val"]["global_loss"] == pytest.approx(loss, rel=1e-5)


def test_loss_metric_picks_the_lowest_and_no_validation_says_test_set(tmp_path):
    proc = run_trainer([*SYNTHETIC, "-outputPath", str(tmp_path), "-run_name", "loss",
                        "--set", "data_config.val_fraction=0.2", "--set", "server_config.best_metric=val_personalized_loss"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = read_metrics(tmp_path / "loss")
    losses = [r["val"]["personalized_loss"] for r in history]
    assert history[-1]["best"]["round"] == history[int(np.argmin(losses))]["round"]
    assert load_ckpt(tmp_path / "loss", "best")["round"] == history[-1]["best"]["round"]

    proc = run_trainer([*SYNTHETIC, "-outputPath", str(tmp_path), "-run_name", "test"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = read_metrics(tmp_path / "test")
    assert "val" not in history[-1] and history[-1]["best"]["metric"] == "global_test_acc"
    best = max(history, key=lambda r: r["global_test_acc"])
    assert history[-1]["best"]["round"] == best["round"]
    assert "chosen on the test set itself" in (tmp_path / "test" / "summary.md").read_text()
    assert "chosen on the test set itself" in proc.stdout
