"""The Shakespeare task (experiments/shakespeare): roles as clients, LEAF's windows and in-order
80/20 split, the minimum-samples filter, the vocabulary, per-client test losses, and a 2-round,
2-process job on the real text."""
from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.config import validate_config
from core.errors import UserError
from core.evaluation import COLUMNS, COUNT, GLOBAL, GLOBAL_LOSS, LOSS_COUNT, PERSONAL, PERSONAL_LOSS, summarize
from core.task import load_task
from experiments.shakespeare.dataloaders.dataset import (VOCAB, ShakespeareDataset, decode, encode, kept_roles,
                                                         parse_speeches, read_roles, role_samples)
from testing.conftest import load_ckpt, read_metrics, run_trainer, write_config
from utils.report import record_scalars


def data_config(**values):
    """A validated data_config section (options as given)."""
    return validate_config({"data_config": values}, "test").data_config


def test_vocabulary_is_the_files_65_characters_in_code_point_order(shakespeare_path):
    text = (shakespeare_path / "input.txt").read_text()
    assert VOCAB == "".join(sorted(set(text))) and len(VOCAB) == 65
    assert decode(encode(text[:1000])) == text[:1000]
    assert encode("\n A a")[[0, 1, 2, 4]].tolist() == [0, 1, VOCAB.index("A"), VOCAB.index("a")]
    with pytest.raises(UserError, match="character 'é' is not in the task's 65-character vocabulary"):
        encode("café", "input.txt")


def test_a_file_with_a_character_outside_the_vocabulary_is_refused(tmp_path):
    (tmp_path / "input.txt").write_text("ROMEO:\nHélas!\n")
    with pytest.raises(UserError, match=r"input.txt: character 'é'"):
        read_roles(str(tmp_path))


def test_speeches_are_parsed_per_role_in_order():
    text = "A:\nline one\nline two\n\nB:\nhi\n\n\nA:\nagain\n\nC:\n\nB:\nyo\n"
    assert parse_speeches(text) == [("A", "line one\nline two"), ("B", "hi"), ("A", "again"), ("B", "yo")]


def test_roles_of_the_real_text(shakespeare_path):
    roles = read_roles(str(shakespeare_path))
    assert len(roles) == 299  # speakers with at least one non-empty speech
    assert sum(len(r.codes) >= 2000 for r in roles) == 99
    assert roles[0].name == "First Citizen"
    assert decode(roles[0].codes[:46]) == "Before we proceed any further, hear me speak.\n"


def test_windows_targets_and_in_order_80_20_split_on_a_known_speech(shakespeare_path):
    cfg = data_config(num_clients=99, min_samples=1500)
    ds_train = ShakespeareDataset(str(shakespeare_path), cfg, split="train")
    ds_test = ShakespeareDataset(str(shakespeare_path), cfg, split="test", split_plan=ds_train.split_plan)
    names = ShakespeareDataset.roles(str(shakespeare_path), cfg)
    assert len(names) == 99 and ds_train.split_plan.num_clients == 99
    client = names.index("First Citizen")
    role = next(r for r in read_roles(str(shakespeare_path)) if r.name == "First Citizen")
    text = decode(role.codes)
    n = len(text) - 80
    train_rows = ds_train.client_indices[client]
    test_rows = ds_test.client_indices[client]
    assert len(train_rows) == math.floor(0.8 * n) and len(train_rows) + len(test_rows) == n
    starts = list(range(len(train_rows))) + list(range(len(train_rows), n))
    rows = [(ds_train, r) for r in train_rows] + [(ds_test, r) for r in test_rows]
    for k in (0, 1, len(train_rows) - 1, len(train_rows), n - 1):  # in text order, train first
        ds, row = rows[k]
        assert decode(ds.inputs[row]) == text[starts[k]:starts[k] + 80]
        assert VOCAB[int(ds.labels[row])] == text[starts[k] + 80]
    assert decode(ds_train.inputs[train_rows[0]]).startswith("Before we proceed any further")
    assert ds_train.inputs.dtype == torch.uint8 and ds_train.labels.dtype == torch.int64
    # clients' rows are contiguous and cover each split once
    for ds in (ds_train, ds_test):
        assert np.array_equal(np.concatenate(ds.client_indices), np.arange(len(ds.labels)))


def test_validation_split_is_the_end_of_each_roles_train_split(shakespeare_path):
    plan = ShakespeareDataset.make_split_plan(str(shakespeare_path),
                                              data_config(num_clients=21, min_samples=500, val_fraction=0.1,
                                                          options={"stride": 20}), seed=0)
    whole = ShakespeareDataset.make_split_plan(str(shakespeare_path),
                                               data_config(num_clients=21, min_samples=500, options={"stride": 20}),
                                               seed=0)
    assert plan.val is not None and whole.val is None
    for train, val, rows in zip(plan.train, plan.val, whole.train):
        assert np.array_equal(np.concatenate([train, val]), rows) and len(val) == round(0.1 * len(rows))


def test_min_samples_drops_small_roles_and_num_clients_must_match(shakespeare_path):
    roles = read_roles(str(shakespeare_path))
    for min_samples, stride in ((1, 1), (1500, 1), (500, 20)):
        kept = kept_roles(str(shakespeare_path), 80, stride, 0.8, min_samples)
        expected = [i for i, r in enumerate(roles) if math.floor(0.8 * len(range(0, len(r.codes) - 80, stride)))
                    >= min_samples]
        assert list(kept) == expected
    assert len(kept_roles(str(shakespeare_path), 80, 20, 0.8, 500)) == 21  # config_cpu.yaml
    assert len(kept_roles(str(shakespeare_path), 80, 1, 0.8, 64)) == 232  # config.yaml
    with pytest.raises(UserError, match=r"data_config.num_clients: 100, but 99 of the 299 roles .* set "
                                        r"data_config.num_clients: 99"):
        ShakespeareDataset(str(shakespeare_path), data_config(num_clients=100, min_samples=1500))


def test_stride_and_train_fraction_options(shakespeare_path):
    role = read_roles(str(shakespeare_path))[0]
    train, test = role_samples(role, 80, 20, 0.5)
    starts = np.arange(0, len(role.codes) - 80, 20)
    assert np.array_equal(np.concatenate([train, test]), starts) and len(train) == len(starts) // 2
    with pytest.raises(UserError, match="data_config.options.stride"):
        ShakespeareDataset(str(shakespeare_path), data_config(num_clients=21, min_samples=500, options={"stride": 0}))


def test_a_data_option_the_dataset_does_not_read_is_refused():
    task = load_task("shakespeare")
    task.check_data_options(data_config(options={"seq_len": 80}))
    with pytest.raises(UserError, match="data_config.options: ShakespeareDataset reads no option 'window'"):
        task.check_data_options(data_config(options={"window": 80}))
    with pytest.raises(UserError, match="data_config.options: GaussianClusters reads no option 'seq_len'"):
        load_task("synthetic").check_data_options(data_config(options={"seq_len": 80}))


def test_models_and_num_classes():
    task = load_task("shakespeare")
    leaf = task.build_model(validate_config({"model_config": {"model_type": "CharRNN", "num_classes": 65}},
                                            "t").model)
    assert leaf.num_parameters() == 815_945  # 8-dim embedding, 2 x LSTM 256, linear decoder
    with pytest.raises(UserError, match="model_config.num_classes: 10, but the Shakespeare vocabulary has 65"):
        task.build_model(validate_config({"model_config": {"model_type": "CharRNN"}}, "t").model)
    small = task.build_model(validate_config({"model_config": {
        "model_type": "CharRNN", "num_classes": 65, "options": {"cell": "gru", "hidden": 16, "layers": 1}}}, "t").model)
    batch = {"x": torch.randint(0, 65, (4, 80), dtype=torch.uint8), "y": torch.randint(0, 65, (4,))}
    out = small.inference(batch)
    assert out["loss"].shape == (4,) and out["correct"].shape == (4,)
    assert torch.allclose(out["loss"].mean(), small.loss(batch))


def test_test_losses_are_summarized_per_client_and_not_shown_as_percent():
    matrix = np.zeros((3, COLUMNS))
    matrix[:, COUNT] = matrix[:, LOSS_COUNT] = [10, 30, 0]
    matrix[:, GLOBAL] = [5, 15, 0]
    matrix[:, GLOBAL_LOSS] = [20.0, 30.0, 0]  # mean 2.0 and 1.0
    matrix[:, PERSONAL] = [6, 0, 0]
    matrix[:, PERSONAL_LOSS] = [10.0, 0, 0]
    out = summarize(matrix, [0], has_personal=True)
    assert out["global_local_loss"]["weighted_mean"] == pytest.approx((20 + 30) / 40)
    assert out["global_local_loss"]["mean"] == pytest.approx(1.5) and out["global_local_loss"]["clients"] == 2
    assert out["personalized_loss"]["weighted_mean"] == pytest.approx(1.0) and out["personalized_loss"]["clients"] == 1
    scalars = record_scalars({"round": 1, **out})
    assert scalars["global test loss"] == pytest.approx(1.25) and scalars["personalized"] == pytest.approx(60.0)
    matrix[:, LOSS_COUNT] = 0  # a model that reports no per-sample loss: no loss figures
    assert "global_local_loss" not in summarize(matrix, [0], has_personal=True)


SMALL = {
    "model_config": {"model_type": "CharRNN", "num_classes": 65, "options": {"cell": "gru", "hidden": 16, "layers": 1}},
    "server_config": {"max_iteration": 2, "num_clients_per_iteration": 3, "val_freq": 1, "ckpt_freq": 2},
    "client_config": {"local_epochs": 1, "batch_size": 32, "optimizer_config": {"type": "sgd", "lr": 1.0},
                      "augment": False},
    "data_config": {"num_clients": 5, "min_samples": 1000, "val_fraction": 0.1, "options": {"stride": 20}},
    "personalization": {"method": "fedper", "local_layers": ["linear"]},
    "seed": 0,
    "device": "cpu",
}


def test_two_round_two_process_job_on_the_real_text(tmp_path, shakespeare_path):
    config = write_config(tmp_path, SMALL)
    proc = run_trainer(["-dataPath", str(shakespeare_path), "-outputPath", str(tmp_path), "-config", str(config),
                        "-task", "shakespeare", "-run_name", "two", "-backend", "gloo"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "two")
    assert [r["round"] for r in records] == [1, 2]
    last = records[-1]
    assert 0 < last["global_test_acc"] < 1
    assert last["global_test_acc"] == pytest.approx(last["global_local"]["weighted_mean"])  # splits cover the test set
    assert last["global_local_loss"]["clients"] == 5 and 0 < last["global_local_loss"]["weighted_mean"] < math.log(65)
    assert last["personalized_loss"]["clients"] == last["personalized"]["clients"] >= 3
    assert last["val"]["global"]["clients"] == 5 and last["best"]["metric"] == "val_global_acc"  # the roles' own
    summary = (tmp_path / "two" / "summary.md").read_text()
    assert "| global test loss | global model (personal layers: clients' mean), clients' local test splits |" in summary
    assert "personalized test loss" in summary and "exp(weighted mean)" in summary
    rows = list(csv.DictReader((tmp_path / "two" / "clients.csv").open()))
    assert len(rows) == 5 and all(float(r["global_loss"]) > 0 for r in rows)
    assert {r["personalized_loss"] != "" for r in rows} == {True, False} or all(r["personalized_loss"] for r in rows)


def test_vectorized_training_of_the_recurrent_model_equals_sequential(tmp_path, shakespeare_path):
    config = dict(SMALL, server_config=dict(SMALL["server_config"], max_iteration=1),
                  data_config=dict(SMALL["data_config"], val_fraction=0.0), personalization={"method": "none"})
    for name, vectorize in (("seq", False), ("vec", True)):
        cfg = dict(config, client_config=dict(SMALL["client_config"], vectorize=vectorize))
        path = write_config(tmp_path, cfg, f"{name}.yaml")
        proc = run_trainer(["-dataPath", str(shakespeare_path), "-outputPath", str(tmp_path), "-config", str(path),
                            "-task", "shakespeare", "-run_name", name])
        assert proc.returncode == 0, proc.stderr[-3000:]
    seq, vec = load_ckpt(tmp_path / "seq")["global"], load_ckpt(tmp_path / "vec")["global"]
    assert torch.allclose(seq, vec, atol=1e-5)


def test_mistakes_are_one_line_exit_2(tmp_path, shakespeare_path):
    too_many = write_config(tmp_path, dict(SMALL, data_config=dict(SMALL["data_config"], num_clients=6)), "many.yaml")
    for data, config, needle in (
            (shakespeare_path, too_many, "data_config.num_clients: 6, but 5 of the 299 roles have at least "
                                         "min_samples 1000 train samples (seq_len 80, stride 20); set "
                                         "data_config.num_clients: 5"),
            (tmp_path, write_config(tmp_path, SMALL), f"-dataPath {tmp_path}: no input.txt")):
        proc = run_trainer(["-dataPath", str(data), "-outputPath", str(tmp_path / "out"), "-config", str(config),
                            "-task", "shakespeare"])
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
