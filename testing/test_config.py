"""Config validation and the one-line, exit-code-2 errors of the command line."""
from __future__ import annotations

import pytest
import torch

import e2e_trainer
from core.config import Config, load_config
from core.errors import UserError
from testing.conftest import REPO, SMALL_CV, read_metrics, run_trainer, write_config


def test_shipped_configs_validate():
    for path in (REPO / "experiments").glob("*/config*.yaml"):
        assert isinstance(load_config(path), Config)


def test_defaults_and_overrides(tmp_path):
    path = write_config(tmp_path, {"server_config": {"max_iteration": 3}})
    cfg = load_config(path, ["client_config.optimizer_config.lr=0.2", "data_config.partition=iid"], seed=9)
    assert cfg.server_config.max_iteration == 3
    assert cfg.client_config.optimizer_config.lr == 0.2
    assert cfg.data_config.partition == "iid"
    assert cfg.seed == 9
    assert cfg.server_config.optimizer_config.lr == 1.0  # documented default: server SGD lr 1 = FedAvg
    assert cfg.to_dict()["model_config"]["model_type"] == "ResNet18"


@pytest.mark.parametrize("content,needle", [
    ({"server_config": {"max_iteratoin": 3}}, "unknown key 'server_config.max_iteratoin'; allowed here: "),
    ({"server_config": {"max_iteration": "ten"}}, "server_config.max_iteration"),
    ({"data_config": {"alpha": -1}}, "data_config.alpha: Input should be greater than 0"),
    ({"data_config": {"partition": "random"}}, "data_config.partition"),
    ({"personalization": {"method": "fedper"}}, "personalization: method fedper needs local_layers, e.g. [linear]"),
    ({"strategy": "scaffold", "client_config": {"optimizer_config": {"type": "adam"}}},
     "(top level): strategy scaffold estimates its controls as (x - y) / (K lr), an SGD step; set "
     "client_config.optimizer_config.type: sgd"),
    ({"bogus_section": {}}, "unknown key 'bogus_section'"),
    ({"server_config": {"num_clients_per_iteration": "5,30"}, "data_config": {"num_clients": 20}},
     "server_config.num_clients_per_iteration (5,30) asks for more clients per round than data_config.num_clients (20)"),
])
def test_bad_values_name_the_field(tmp_path, content, needle):
    with pytest.raises(UserError) as err:
        load_config(write_config(tmp_path, content))
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert "Value error" not in message and "(got {" not in message, "a section's check does not echo the section"


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server_config: {max_iteration: 3\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="expected key.path=value"):
        load_config(write_config(tmp_path, {}), ["server_config.max_iteration"])
    with pytest.raises(UserError, match="expected key.path=value"):
        load_config(write_config(tmp_path, {}), ["=5"])
    with pytest.raises(UserError, match=r"personalization.local_layers=\[linear': the value is not valid YAML"):
        load_config(write_config(tmp_path, {}), ["personalization.local_layers=[linear"])
    empty_section = tmp_path / "empty_section.yaml"
    empty_section.write_text("server_config:\n")
    assert load_config(empty_section, ["server_config.max_iteration=3"]).server_config.max_iteration == 3
    assert load_config(empty_section).server_config == Config().server_config, "an empty section: its defaults"
    empty_section.write_text("server_config:\n  max_iteration: 3\n  optimizer_config:\n")
    assert load_config(empty_section).server_config.optimizer_config == Config().server_config.optimizer_config
    # docs/config.md: a written section's missing keys take the section's own defaults (server lr 0.05, not 1.0)
    written = load_config(write_config(tmp_path, {"server_config": {"optimizer_config": {"momentum": 0.9}},
                                                  "client_config": {"optimizer_config": {"lr": 0.1}}}))
    assert written.server_config.optimizer_config.lr == 0.05 and Config().server_config.optimizer_config.lr == 1.0
    assert written.client_config.optimizer_config.momentum == 0.0 and Config().client_config.optimizer_config.momentum == 0.9


def _cli(tmp_path, capsys, config: dict, data, task="cv", extra=()):
    path = write_config(tmp_path, config)
    code = e2e_trainer.main(["-dataPath", str(data), "-outputPath", str(tmp_path / "out"), "-config", str(path),
                             "-task", task, "-run_name", "r", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("change,task,needle", [
    ({}, "nlp_missing", "-task nlp_missing: no task folder"),
    ({"model_config": {"model_type": "ResNet1000"}}, "cv", "model_config.model_type: unknown model 'ResNet1000'"),
    ({"personalization": {"method": "fedper", "local_layers": ["head"]}}, "cv", "personalization.local_layers: ['head']"),
    ({"client_config": {"batch_size": 0}}, "cv", "client_config.batch_size"),
    ({"model_config": {"model_type": "SmallCNN", "options": {"width": 2}}}, "cv",
     "model_config.options: SmallCNN reads no option 'width' (it reads: none)"),
    ({"model_config": {"model_type": "SmallCNN", "num_classes": 5}}, "cv",
     "model_config.num_classes 5: the train labels go up to 9; set num_classes to at least 10"),
    ({"personalization": {"method": "fedper", "local_layers": ["features", "fc", "linear"]}}, "cv",
     "cover every parameter of SmallCNN, so nothing is shared"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, cifar_path, change, task, needle):
    config = {**SMALL_CV, **change}
    code, err = _cli(tmp_path, capsys, config, cifar_path, task)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("pfedsim: error: ") and needle in err[0], err


def test_missing_data_names_the_folder(tmp_path, capsys):
    code, err = _cli(tmp_path, capsys, SMALL_CV, tmp_path / "nowhere")
    assert code == 2 and len(err) == 1
    assert "cifar-10-batches-py" in err[0] and str(tmp_path / "nowhere") in err[0]


def test_existing_run_is_not_overwritten(tmp_path, capsys, cifar_path):
    run = tmp_path / "out" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    code, err = _cli(tmp_path, capsys, SMALL_CV, cifar_path)
    assert code == 2 and "already holds results" in err[0]
    assert (run / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_real_process_exit_code_and_help(tmp_path):
    path = write_config(tmp_path, {"server_config": {"val_freq": 0}})
    proc = run_trainer(["-dataPath", str(tmp_path), "-outputPath", str(tmp_path), "-config", str(path), "-task", "cv"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "server_config.val_freq" in proc.stderr
    helptext = run_trainer(["-h"]).stdout
    for flag in ("-dataPath", "-outputPath", "-config", "-task", "-backend", "-seed", "-run_name", "-resume", "--set"):
        assert flag in helptext


SYNTHETIC = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pfedsim: error: "), err
    return err[0]


def test_launch_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path / "afile")]) == 2
    assert "-outputPath" in _one_line(capsys) and (tmp_path / "afile").read_text() == ""
    assert e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path / "afile" / "runs")]) == 2
    assert "-outputPath " + str(tmp_path / "afile" / "runs") + ": cannot create the folder" in _one_line(capsys)
    assert e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path), "-run_name", "../elsewhere"]) == 2
    assert "plain folder name" in _one_line(capsys)
    with pytest.raises(SystemExit) as stop:  # argparse's own mistakes, in the same one-line form
        e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path), "-seed", "abc"])
    assert stop.value.code == 2 and "argument -seed: invalid int value: 'abc'" in _one_line(capsys)
    assert e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path / "out"), "-resume"]) == 2
    assert "-resume without a path continues the -run_name folder" in _one_line(capsys)
    assert e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path / "out"), "-run_name", "r", "-resume"]) == 2
    assert "not found" in _one_line(capsys) and not (tmp_path / "out").exists(), "nothing made for a failed start"


def test_resume_refuses_another_config_and_leaves_the_run_as_it_was(tmp_path, capsys):
    run = tmp_path / "r"
    base = [*SYNTHETIC, "-outputPath", str(tmp_path), "-run_name", "r", "--set", "server_config.ckpt_freq=2"]
    assert e2e_trainer.main(base + ["--set", "server_config.max_iteration=2"]) == 0
    capsys.readouterr()
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != "run.lock"}
    assert e2e_trainer.main(base + ["-resume", "--set", "server_config.max_iteration=4", "--set", "strategy=scaffold"]) == 2
    assert "the config differs from the checkpoint's (strategy: 'fedavg' there, 'scaffold' now)" in _one_line(capsys)
    assert e2e_trainer.main(base + ["-resume", str(run / "summary.md")]) == 2
    assert "is not a pfedsim checkpoint" in _one_line(capsys)
    assert e2e_trainer.main(base + ["-resume", "--set", "server_config.max_iteration=1"]) == 2
    assert "the checkpoint is at round 2, past server_config.max_iteration 1" in _one_line(capsys)
    older = tmp_path / "older.pt"  # a checkpoint of before checkpoints held their config: the model size still counts
    torch.save({k: v for k, v in torch.load(run / "checkpoints" / "latest.pt", weights_only=False).items()
                if k not in ("config", "checksum")}, older)
    assert e2e_trainer.main(base + ["-run_name", "r_old", "-resume", str(older), "--set", "model_config.num_classes=20"]) == 2
    assert "its global model holds 2762 values, this config's model 3412" in _one_line(capsys)
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != "run.lock"} == before
    # more rounds, another evaluation cadence and a compute switch are a continuation, not another run
    assert e2e_trainer.main(base + ["-resume", "--set", "server_config.max_iteration=4", "--set",
                                    "server_config.val_freq=1", "--set", "client_config.vectorize=true"]) == 0


def test_resume_into_another_runs_folder_is_refused(tmp_path, capsys):
    base = [*SYNTHETIC, "-outputPath", str(tmp_path), "--set", "server_config.max_iteration=2"]
    assert e2e_trainer.main(base + ["-run_name", "a"]) == 0
    assert e2e_trainer.main(base + ["-run_name", "b", "-seed", "1"]) == 0
    capsys.readouterr()
    before = {f: f.read_bytes() for f in (tmp_path / "b").rglob("*") if f.is_file()}
    assert e2e_trainer.main(base + ["-run_name", "b", "-resume", str(tmp_path / "a"),
                                    "--set", "server_config.max_iteration=3"]) == 2
    assert "already holds the results of a run other than" in _one_line(capsys)
    assert {f: f.read_bytes() for f in (tmp_path / "b").rglob("*") if f.is_file()} == before
    # a bare -resume continues the -run_name folder, even when the config names another checkpoint
    assert e2e_trainer.main(base + ["-run_name", "b", "-seed", "1", "-resume", "--set", "server_config.max_iteration=3",
                                    "--set", f"server_config.resume_from_checkpoint={tmp_path / 'a'}"]) == 0
    assert [r["round"] for r in read_metrics(tmp_path / "b")] == [2, 3]
    # continuing a run into a new folder (a branch of it) stays allowed
    assert e2e_trainer.main(base + ["-run_name", "c", "-resume", str(tmp_path / "a"),
                                    "--set", "server_config.max_iteration=3"]) == 0
