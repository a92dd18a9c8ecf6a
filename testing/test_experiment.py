"""Reloading runs: evaluate.py reproduces the recorded accuracies; Experiment gives the global and the
personalized models and their data; user mistakes are one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
from testing.conftest import REPO, SMALL_CV, failure_text, read_metrics, run_trainer, write_config
from utils.experiment import Experiment

TINY_CV = {**SMALL_CV, "server_config": {**SMALL_CV["server_config"], "max_iteration": 2}}
SYNTHETIC = {"model_config": {"model_type": "MLP"},
             "server_config": {"max_iteration": 3, "num_clients_per_iteration": 3, "val_freq": 3, "ckpt_freq": 3},
             "client_config": {"batch_size": 32, "augment": False, "optimizer_config": {"type": "sgd", "lr": 0.1}},
             "data_config": {"num_clients": 12, "alpha": 0.5},
             "personalization": {"method": "fedper", "local_layers": ["linear"], "new_client_epochs": 1},
             "device": "cpu"}


def _run(tmp, name, config, task, data):
    path = write_config(tmp, config, f"{name}.yaml")
    proc = run_trainer(["-dataPath", str(data), "-outputPath", str(tmp), "-config", str(path), "-task", task,
                        "-run_name", name])
    assert proc.returncode == 0, failure_text(proc)
    return tmp / name


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, cifar_path):
    """2 rounds of FedPer on real CIFAR-10, evaluated and checkpointed at round 2."""
    return _run(tmp_path_factory.mktemp("cv"), "tiny", TINY_CV, "cv", cifar_path)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """FedPer on the synthetic task, never-trained clients fine-tuned and evaluated too."""
    return _run(tmp_path_factory.mktemp("syn"), "syn", SYNTHETIC, "synthetic", "unused")


def _accuracy(model, batches) -> float:
    correct = total = 0.0
    with torch.no_grad():
        for batch in batches:
            out = model.inference(batch)
            correct += float(out["acc"]) * out["batch_size"]
            total += out["batch_size"]
    return correct / total


def _stats_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value == pytest.approx(b[key], abs=1e-9), key


def test_evaluate_cli_reproduces_the_recorded_round(cv_run):
    """evaluate.py recomputes the metrics.jsonl record of the reloaded round (same computation)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "evaluate.py", "-run", str(cv_run), "--reload", "best"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "personalized models, trained clients" in proc.stdout
    doc = json.loads((cv_run / "eval_best.json").read_text())
    best = max(read_metrics(cv_run), key=lambda r: r["global_test_acc"])
    assert doc["round"] == best["round"] and doc["recorded"] == best
    assert doc["results"]["global_test_acc"] == pytest.approx(best["global_test_acc"], abs=1e-9)
    for section in ("global_local", "personalized", "global_on_personalized_clients"):
        _stats_equal(doc["results"][section], best[section])
    assert (cv_run / "eval_best_clients.csv").is_file()


def test_personalized_model_of_a_client_matches_clients_csv(cv_run):
    """FedPer: client c's model has its own head; its accuracy on c's test split is what the run recorded."""
    exp = Experiment(cv_run, device="cpu")
    assert exp.metrics() == read_metrics(cv_run)
    assert exp.config.personalization.method == "fedper"
    rows = [line.split(",") for line in (cv_run / "clients.csv").read_text().splitlines()[1:]]
    trained = [r for r in rows if r[3]]
    cid, _, global_acc, personal_acc = max(trained, key=lambda r: int(r[1]))  # most test samples
    cid = int(cid)
    global_model = exp.load_model("last")
    personal = exp.load_model("last", client=cid)
    assert not personal.training and not global_model.training
    g, p = dict(global_model.named_parameters()), dict(personal.named_parameters())
    assert not torch.equal(g["linear.weight"], p["linear.weight"]), "the personal head comes from the client store"
    assert all(torch.equal(g[n], p[n]) for n in g if not n.startswith("linear")), "the body is the global one"
    data = exp.dataloaders(client=cid)
    assert data.test.num_samples == int(dict((r[0], r[1]) for r in rows)[str(cid)])
    assert _accuracy(personal, data.test) == pytest.approx(float(personal_acc), abs=1e-6)
    assert _accuracy(global_model, data.test) == pytest.approx(float(global_acc), abs=1e-6)


def test_new_clients_and_another_partition(synthetic_run, capsys):
    """Never-trained clients are fine-tuned as the run did; a new partition makes every client new."""
    exp = Experiment(synthetic_run)
    record, matrix, trained = exp.evaluate("last")
    recorded = read_metrics(synthetic_run)[-1]
    _stats_equal(record["new_clients"], recorded["new_clients"])
    _stats_equal(record["personalized"], recorded["personalized"])
    new_client = next(c for c in range(SYNTHETIC["data_config"]["num_clients"]) if c not in trained)
    model = exp.load_model("last", client=new_client)
    acc = _accuracy(model, exp.dataloaders(client=new_client).test)
    assert acc == pytest.approx(matrix[new_client, 3] / matrix[new_client, 2], abs=1e-6)

    assert evaluate.main(["-run", str(synthetic_run), "--reload", "last", "--set", "data_config.alpha=5.0"]) == 0
    doc = json.loads((synthetic_run / "eval_last_alpha=5.0.json").read_text())
    assert doc["partition_changed"] and doc["recorded"] is None
    assert doc["results"]["personalized"]["clients"] == 0
    assert doc["results"]["new_clients"]["clients"] == SYNTHETIC["data_config"]["num_clients"]
    # the same model and samples; the counts are float32 sums of accuracy x batch size over other
    # batches under the new partition, so they agree to float32 rounding (one sample is 2e-3)
    assert doc["results"]["global_test_acc"] == pytest.approx(recorded["global_test_acc"], abs=1e-6)
    assert doc["note"] is None
    assert evaluate.main(["-run", str(synthetic_run), "--reload", "last", "--set", "data_config.alpha=5.0",
                          "--set", "personalization.new_client_epochs=0"]) == 0
    assert "note: the new partition makes every client a new one" in capsys.readouterr().out


def test_ditto_client_model_is_its_personal_model(tmp_path):
    config = {**SYNTHETIC, "personalization": {"method": "ditto", "ditto_lambda": 0.1}}
    run = _run(tmp_path, "ditto", config, "synthetic", "unused")
    exp = Experiment(run)
    state = exp.checkpoint("last")
    cid, entry = next(iter(state["client_store"]["entries"].items()))
    model = exp.load_model("last", client=cid)
    flat = torch.cat([t.detach().reshape(-1) for t in list(model.parameters()) + list(model.buffers())])
    assert torch.equal(flat, entry[-flat.numel():])
    assert not torch.allclose(flat, state["global"])


def test_user_errors_are_one_line(tmp_path, synthetic_run, capsys):
    def error(argv) -> str:
        try:
            code = evaluate.main(argv)
        except SystemExit as stop:  # argparse's own mistakes
            code = stop.code
        assert code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pfedsim: error: ")
        return lines[0]

    assert "not found" in error(["-run", str(tmp_path / "missing")])
    assert "choose one of last, best" in error(["-run", str(synthetic_run), "--reload", "worst"])
    assert "may only change" in error(["-run", str(synthetic_run), "--set", "model_config.num_classes=3"])
    (tmp_path / "afile").write_text("")
    assert "cannot create the folder" in error(["-run", str(synthetic_run), "-out", str(tmp_path / "afile" / "x.json")])
    assert "unrecognized arguments: --relod" in error(["-run", str(synthetic_run), "--relod", "best"])  # argparse's mistakes: one line too
    assert "unknown key 'data_config.alphax'" in error(["-run", str(synthetic_run), "--set", "data_config.alphax=1"])
    old = tmp_path / "old"
    shutil.copytree(synthetic_run, old)
    (old / "run.json").unlink()
    assert "run.json not found" in error(["-run", str(old)]) and "-task" in error(["-run", str(old)])
    reloaded = Experiment(old, task="synthetic", data_path="unused").load_model("last")
    assert torch.equal(next(reloaded.parameters()), next(Experiment(synthetic_run).load_model("last").parameters()))
    (old / "checkpoints" / "best.pt").unlink()
    assert "checkpoints/best.pt not found" in error(["-run", str(old), "-task", "synthetic", "-dataPath", "x"])
    assert "try --reload last" in error(["-run", str(old), "-task", "synthetic", "-dataPath", "x"])
    shutil.rmtree(old / "checkpoints")
    assert "resume the run until it checkpoints" in error(["-run", str(old), "-task", "synthetic", "-dataPath", "x"])
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in error(["-run", str(synthetic_run), "-device", "cuda"])
        assert "no CUDA GPU is visible" in error(["-run", str(synthetic_run), "--set", "device=cuda"])


def test_run_json_records_task_data_and_command(synthetic_run):
    info = json.loads((synthetic_run / "run.json").read_text())
    assert info["task"] == "synthetic" and info["dataPath"].endswith("unused")
    assert info["commands"][0].startswith("e2e_trainer.py -dataPath unused")
