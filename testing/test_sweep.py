"""sweep.py: grid x seeds as separate runs, a mean/std table, skipping finished runs, resuming
interrupted ones, one TensorBoard log dir per run, and one-line errors before anything starts."""
from __future__ import annotations

import csv

import numpy as np
import pytest

import sweep
from testing.conftest import failure_text, load_ckpt, read_metrics, run_trainer, write_config
from utils.sweep import assignment_slug, parse_axis, plan

CONFIG = {"model_config": {"model_type": "MLP"},
          "server_config": {"max_iteration": 4, "num_clients_per_iteration": 3, "val_freq": 2, "ckpt_freq": 2},
          "client_config": {"batch_size": 32, "augment": False, "optimizer_config": {"type": "sgd", "lr": 0.1}},
          "data_config": {"num_clients": 10, "alpha": 0.5},
          "personalization": {"method": "fedper", "local_layers": ["linear"]},
          "device": "cpu"}
GRID = "client_config.optimizer_config.lr=0.05,0.2"
RUNS = ["lr=0.05_seed=0", "lr=0.05_seed=1", "lr=0.2_seed=0", "lr=0.2_seed=1"]


def _args(tmp, *extra):  # no -dataPath: the synthetic task reads no files
    return ["-config", str(tmp / "config.yaml"), "-task", "synthetic", "-outputPath", str(tmp),
            "-name", "sw", *extra]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A run interrupted after round 2 of 4, then a 2 x 1 grid with 2 seeds (2 jobs) in the same folder."""
    tmp = tmp_path_factory.mktemp("sweep")
    write_config(tmp, CONFIG)
    proc = run_trainer(["-dataPath", "unused", "-outputPath", str(tmp / "sw"), "-config", str(tmp / "config.yaml"),
                        "-task", "synthetic", "-run_name", RUNS[0], "-seed", "0",
                        "--set", "client_config.optimizer_config.lr=0.05", "--set", "server_config.max_iteration=2"])
    assert proc.returncode == 0, failure_text(proc)
    assert sweep.main(_args(tmp, "--grid", GRID, "--seeds", "2", "--jobs", "2")) == 0
    return tmp, tmp / "sw"


def test_every_grid_point_and_seed_runs_to_the_end(swept):
    _, folder = swept
    assert sorted(p.name for p in folder.iterdir() if (p / "metrics.jsonl").is_file()) == RUNS
    for name in RUNS:
        assert load_ckpt(folder / name)["round"] == 4
        assert [r["round"] for r in read_metrics(folder / name)] == [2, 4]
    first, second = (load_ckpt(folder / name)["global"] for name in RUNS[:2])
    assert not np.allclose(first, second), "the seeds differ"


def test_interrupted_run_was_resumed(swept):
    _, folder = swept
    log = (folder / "logs" / f"{RUNS[0]}.log").read_text()
    assert "-resume" in log and "round 4/4" in log and "round 2/4" not in log
    assert "-resume" not in (folder / "logs" / f"{RUNS[1]}.log").read_text()


def test_table_has_mean_and_std_over_seeds(swept):
    _, folder = swept
    rows = list(csv.DictReader(open(folder / "sweep.csv")))
    assert [r["client_config.optimizer_config.lr"] for r in rows] == ["0.05", "0.2"]
    for row, names in zip(rows, (RUNS[:2], RUNS[2:])):
        final = [read_metrics(folder / n)[-1] for n in names]
        glob = [r["global_test_acc"] for r in final]
        pers = [r["personalized"]["weighted_mean"] for r in final]
        assert row["seeds"] == "2"
        assert float(row["final_global_mean"]) == pytest.approx(np.mean(glob), abs=1e-6)
        assert float(row["final_global_std"]) == pytest.approx(np.std(glob, ddof=1), abs=1e-6)
        assert float(row["final_personalized_mean"]) == pytest.approx(np.mean(pers), abs=1e-6)
        best = [max(r["global_test_acc"] for r in read_metrics(folder / n)) for n in names]
        assert float(row["best_global_mean"]) == pytest.approx(np.mean(best), abs=1e-6)
    first = [read_metrics(folder / n)[-1]["global_test_acc"] for n in RUNS[:2]]
    table = (folder / "sweep.md").read_text()
    assert f"| 0.05 | 2 | {100 * np.mean(first):.2f} ± {100 * np.std(first, ddof=1):.2f} |" in table
    assert (folder / "plots" / "accuracy.png").is_file()


def test_a_sweep_without_privacy_has_no_epsilon_column_or_plot(swept):
    _, folder = swept
    assert "epsilon" not in next(csv.reader(open(folder / "sweep.csv")))
    assert "epsilon" not in (folder / "sweep.md").read_text()
    assert not (folder / "plots" / "accuracy_vs_epsilon.png").exists()


def test_second_invocation_skips_everything(swept, capsys):
    tmp, folder = swept
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.suffix != ".png"
              and p.name not in ("sweep.md", "sweep.csv")}
    assert sweep.main(_args(tmp, "--grid", GRID, "--seeds", "2", "--jobs", "2")) == 0
    assert "4 finished (skipped), 0 to resume, 0 to start" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before, "nothing of the runs was touched"


def test_tensorboard_shows_every_run(swept):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    _, folder = swept
    mux = EventMultiplexer().AddRunsFromDirectory(str(folder))
    mux.Reload()
    assert sorted(mux.Runs()) == RUNS
    for name in RUNS:
        steps = [e.step for e in mux.Scalars(name, "global test")]
        assert steps[-1] == 4 and 2 in steps


def test_mistakes_fail_before_any_run(tmp_path, swept, capsys):
    write_config(tmp_path, CONFIG)

    def error(*argv) -> str:
        assert sweep.main(_args(tmp_path, *argv)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pfedsim: error: ")
        return lines[0]

    assert "expected key.path=v1,v2" in error("--grid", "client_config.optimizer_config.lr")
    assert "unknown key 'client_config.optimizer_config.lrx'" in error("--grid", "client_config.optimizer_config.lrx=1,2")
    assert "grid point alpha=-1" in error("--grid", "data_config.alpha=0.5,-1")
    assert "non-empty and distinct" in error("--grid", "data_config.alpha=0.5,0.5")
    assert "--seeds" in error("--grid", "seed=1,2")
    assert "given twice" in error("--grid", "data_config.alpha=1", "--grid", "data_config.alpha=2")
    assert "grid point model_type=Foo: model_config.model_type: unknown model 'Foo'" in error(
        "--grid", "model_config.model_type=MLP,Foo")
    assert "the value is not valid YAML" in error("--grid", "data_config.alpha=0.5,{a")
    assert not (tmp_path / "sw").exists(), "nothing was launched"
    (tmp_path / "afile").write_text("")
    assert sweep.main(_args(tmp_path, "-outputPath", str(tmp_path / "afile"), "--grid", GRID)) == 2
    assert ": cannot create the folder" in capsys.readouterr().err
    other, folder = swept
    assert sweep.main(_args(other, "--grid", GRID, "--set", "client_config.batch_size=8")) == 2
    assert "holds a run of another config (client_config.batch_size: 32 there, 8 now)" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("lr=")) == RUNS


def test_grid_values_and_names(tmp_path):
    axis = parse_axis('server_config.num_clients_per_iteration=["5,10", 8]')
    runs = plan(str(write_config(tmp_path, CONFIG)), [], [axis], 1)
    assert [r.config.server_config.num_clients_per_iteration for r in runs] == ["5,10", 8]
    assert [r.name for r in runs] == ["num_clients_per_iteration=5-10_seed=0", "num_clients_per_iteration=8_seed=0"]
    assert assignment_slug([("client_config.optimizer_config.lr", "0.1"), ("server_config.optimizer_config.lr", "1"),
                            ("seed", 0)]) == "client_config.optimizer_config.lr=0.1_server_config.optimizer_config.lr=1_seed=0"


def test_run_made_before_a_new_config_key_still_counts_as_finished(swept, capsys):
    """A run folder written before a config field existed (key absent from config.resolved.yaml) is
    the same config when the field has its default: skipped, not refused as another config."""
    import yaml
    tmp, folder = swept
    resolved = folder / RUNS[0] / "config.resolved.yaml"
    stored = yaml.safe_load(resolved.read_text())
    del stored["data_config"]["pad_mode"]
    resolved.write_text(yaml.safe_dump(stored, sort_keys=False))
    assert sweep.main(_args(tmp, "--grid", GRID, "--seeds", "2")) == 0
    assert "4 finished (skipped)" in capsys.readouterr().out


def test_runs_with_several_processes_match_the_single_process_run(swept):
    """--nproc 2: each run under torch.distributed.run (2 ranks, gloo), recorded in run.json, and the
    same model as the single-process run of the same grid point and seed (worker-count invariance)."""
    import json
    tmp, folder = swept
    argv = _args(tmp, "--grid", "client_config.optimizer_config.lr=0.05", "--nproc", "2")
    argv[argv.index("sw")] = "sw_nproc2"
    assert sweep.main(argv) == 0
    run = tmp / "sw_nproc2" / RUNS[0]
    info = json.loads((run / "run.json").read_text())
    assert info["world_sizes"] == [2]
    assert json.loads((folder / RUNS[0] / "run.json").read_text())["world_sizes"] == [1, 1], "started, then resumed"
    assert np.allclose(load_ckpt(run)["global"], load_ckpt(folder / RUNS[0])["global"], atol=1e-5)
    assert [r["round"] for r in read_metrics(run)] == [2, 4]


def test_method_grid_gives_each_method_its_own_personal_layers(tmp_path, capsys):
    """--grid personalization.method=none,fedper,finetune on a FedPer config (issue 26 point 4): the
    config's local_layers stay with fedper, the methods that choose their own get [], the runs have
    short names, and sweep.md says what the sweep set besides the grid."""
    import yaml
    write_config(tmp_path, {**CONFIG, "server_config": {**CONFIG["server_config"], "max_iteration": 2}})
    assert sweep.main(_args(tmp_path, "--grid", "personalization.method=none,fedper,finetune")) == 0
    folder = tmp_path / "sw"
    names = ["method=none_seed=0", "method=fedper_seed=0", "method=finetune_seed=0"]
    assert sorted(p.name for p in folder.iterdir() if (p / "metrics.jsonl").is_file()) == sorted(names)
    for name, method, layers in zip(names, ("none", "fedper", "finetune"), ([], ["linear"], [])):
        resolved = yaml.safe_load((folder / name / "config.resolved.yaml").read_text())["personalization"]
        assert (resolved["method"], resolved["local_layers"]) == (method, layers)
        assert [r["round"] for r in read_metrics(folder / name)] == [2]
    report = (folder / "sweep.md").read_text()
    assert ("Set by the sweep besides the grid (a method that chooses its own personal parameters ignores the "
            "config's personalization.local_layers): method=none: personalization.local_layers=[]; "
            "method=finetune: personalization.local_layers=[].") in report
    assert [row.split(" | ")[0] for row in report.splitlines() if row.startswith("| ")][1:] == [
        "| none", "| fedper", "| finetune"]
    capsys.readouterr()
    assert sweep.main(_args(tmp_path, "--grid", "personalization.method=none,fedper,finetune")) == 0
    assert "3 finished (skipped)" in capsys.readouterr().out


def test_method_grid_refuses_layers_read_the_other_way_round(tmp_path, capsys):
    write_config(tmp_path, CONFIG)
    assert sweep.main(_args(tmp_path, "--grid", "personalization.method=fedper,lgfedavg")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pfedsim: error: grid point method=lgfedavg: method lgfedavg: "
                                                   "the config's personalization.local_layers ['linear'] name method "
                                                   "fedper's personal head")
    assert "--grid 'personalization=[{method: fedper, local_layers: [linear]}" in lines[0]
    none = {**CONFIG, "personalization": {"method": "none"}}
    assert sweep.main(_args(tmp_path, "-config", str(write_config(tmp_path, none, "none.yaml")),
                            "--grid", "personalization.method=none,fedper")) == 2
    assert "grid point method=fedper: method fedper needs personalization.local_layers" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists(), "nothing was launched"


def test_section_grid_names_are_short_and_old_sweep_folders_are_found_again(tmp_path):
    from utils.sweep import with_existing_names
    axis = parse_axis("personalization=[{method: fedper, local_layers: [linear]}, {method: lgfedavg, "
                      "local_layers: [hidden]}, {method: none}, {method: fedrep}]")
    runs = plan(str(write_config(tmp_path, CONFIG)), [], [axis], 1)
    assert [r.name for r in runs] == ["local_layers=linear_method=fedper_seed=0",
                                      "local_layers=hidden_method=lgfedavg_seed=0", "method=none_seed=0",
                                      "method=fedrep_seed=0"]
    assert [r.config.personalization.local_layers for r in runs] == [["linear"], ["hidden"], [], ["linear"]]
    assert runs[3].overrides == ["personalization={method: fedrep}", "personalization.local_layers=[linear]"]
    old = tmp_path / "sw" / "personalization=-local_layers---linear---method--fedper-_seed=0"
    old.mkdir(parents=True)
    renamed = with_existing_names(tmp_path / "sw", runs)
    assert [r.name for r in renamed] == [old.name] + [r.name for r in runs[1:]]
    assert assignment_slug([("personalization.local_layers", "[hidden, linear]"), ("seed", 1)]) == \
        "local_layers=hidden+linear_seed=1"
