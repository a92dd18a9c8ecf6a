"""experiments/cv/baselines/run_baselines.py: configs x seeds, published vs ours in one table."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from testing.conftest import REPO, read_metrics

SHORT = ["--set", "server_config.max_iteration=2", "--set", "server_config.val_freq=1",
         "--set", "server_config.ckpt_freq=2", "--set", "client_config.local_epochs=1"]
CONFIGS = ["fedrep_s2_fedavg.yaml", "fedrep_s2_fedper.yaml"]


def _script():
    spec = importlib.util.spec_from_file_location("run_baselines",
                                                  REPO / "experiments" / "cv" / "baselines" / "run_baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ran(tmp_path_factory, cifar_path):
    out = tmp_path_factory.mktemp("baselines")
    args = ["-dataPath", str(cifar_path), "-outputPath", str(out), "--seeds", "2", "--configs", *CONFIGS, *SHORT]
    assert _script().main(args) == 0
    return out / "baselines", args


def test_every_config_declares_what_it_reproduces():
    script = _script()
    configs = script.config_paths(None)
    assert len(configs) >= 14
    for config in configs:
        assert "# published:" in config.read_text(), config.name
    assert script.published(script.HERE / "niid_fedavg_dir05.yaml")[:2] == ("global", 63.4)


def test_table_has_published_figures_and_our_mean_over_seeds(ran):
    folder, _ = ran
    rows = [line for line in (folder / "baselines.md").read_text().splitlines() if line.startswith("| fedrep")]
    assert len(rows) == 2 and (folder / "plots" / "accuracy.png").stat().st_size > 0
    cells = {r.split(" | ")[0].strip("| "): [c.strip() for c in r.strip("|").split("|")] for r in rows}
    finals = [read_metrics(folder / "fedrep_s2_fedper" / f"seed={s}")[-1]["personalized"]["weighted_mean"]
              for s in (0, 1)]
    fedper = cells["fedrep_s2_fedper"]
    assert fedper[1] == "personalized 85" and fedper[6] == "2"
    assert fedper[4] == f"{100 * np.mean(finals):.1f} ± {100 * np.std(finals, ddof=1):.1f}"
    assert fedper[5] == f"{100 * np.mean(finals) - 85:+.1f}"
    assert fedper[7] == f"0: {100 * finals[0]:.2f}, 1: {100 * finals[1]:.2f}"
    assert cells["fedrep_s2_fedavg"][1] == "-" and cells["fedrep_s2_fedavg"][5] == "-"
    fedavg_finals = [read_metrics(folder / "fedrep_s2_fedavg" / f"seed={s}")[-1]["global_test_acc"] for s in (0, 1)]
    assert cells["fedrep_s2_fedavg"][7] == f"0: {100 * fedavg_finals[0]:.2f}, 1: {100 * fedavg_finals[1]:.2f}"


def test_second_invocation_runs_nothing(ran):
    folder, args = ran
    metrics = folder / "fedrep_s2_fedper" / "seed=0" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    assert _script().main(args) == 0
    assert metrics.stat().st_mtime_ns == before


def test_report_only_starts_nothing_and_counts_finished_seeds(ran):
    folder, args = ran
    more = [a if a != "2" else "3" for a in args] + ["--report-only"]
    assert _script().main(more) == 0
    assert not (folder / "fedrep_s2_fedper" / "seed=2").exists()
    lines = (folder / "baselines.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| fedrep_s2_fedper"))
    assert row.strip("|").split("|")[6].strip() == "2"
    assert "the finished runs of 3 seed(s)" in (folder / "baselines.md").read_text()


def test_unknown_config_is_one_line(tmp_path, capsys):
    assert _script().main(["-dataPath", "d", "-outputPath", str(tmp_path), "--configs", "nope.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.yaml not found" in err[0]


def test_one_seed_shows_the_value_without_a_std():
    """With one seed there is no sample std: the cell is the value alone, with 2+ seeds mean ± std."""
    script = _script()
    assert script._pct((0.7093, 0.0, 1)) == "70.9"
    assert script._pct((0.7093, 0.012, 3)) == "70.9 ± 1.2"
    assert script._pct(None) == "-"
