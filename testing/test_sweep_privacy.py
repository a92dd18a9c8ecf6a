"""sweep.py under central DP: the epsilon each grid point spent (its runs' own final record) in
sweep.csv and sweep.md, and plots/accuracy_vs_epsilon.png with one line per other grid value."""
from __future__ import annotations

import csv
import math

import pytest

import sweep
from testing.conftest import read_metrics, write_config
from testing.test_sweep import CONFIG
from utils.sweep import Axis, epsilon_figure, epsilon_series, markdown_table, parse_axis

DP = {"mechanism": "gaussian", "clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5}
NOISE = "privacy.noise_multiplier=0,1.0"
METHOD = "personalization.method=none,fedper"
RUNS = {("0", "none"): "noise_multiplier=0_method=none_seed=0", ("0", "fedper"): "noise_multiplier=0_method=fedper_seed=0",
        ("1.0", "none"): "noise_multiplier=1.0_method=none_seed=0",
        ("1.0", "fedper"): "noise_multiplier=1.0_method=fedper_seed=0"}


@pytest.fixture(scope="module")
def dp_swept(tmp_path_factory):
    """A 2 noise multipliers x 2 methods DP sweep of the synthetic task, 2 rounds each (2 jobs)."""
    tmp = tmp_path_factory.mktemp("dpsweep")
    config = {**CONFIG, "privacy": DP, "strategy_config": {"client_weighting": "uniform"},
              "server_config": {**CONFIG["server_config"], "max_iteration": 2}}
    write_config(tmp, config)
    argv = ["-config", str(tmp / "config.yaml"), "-task", "synthetic", "-outputPath", str(tmp), "-name", "dp",
            "--grid", NOISE, "--grid", METHOD, "--jobs", "2"]
    assert sweep.main(argv) == 0
    return tmp / "dp"


def _final_privacy(run_dir) -> dict:
    return read_metrics(run_dir)[-1]["privacy"]


def test_csv_gives_each_grid_points_final_epsilon_and_delta(dp_swept):
    rows = list(csv.DictReader(open(dp_swept / "sweep.csv")))
    assert len(rows) == 4
    for row in rows:
        spent = _final_privacy(dp_swept / RUNS[row["privacy.noise_multiplier"], row["personalization.method"]])
        assert float(row["delta"]) == spent["delta"] == 1e-5
        if row["privacy.noise_multiplier"] == "0":
            assert spent["epsilon"] is None and row["epsilon"] == "inf"
        else:
            assert 0 < spent["epsilon"] < math.inf
            assert float(row["epsilon"]) == pytest.approx(spent["epsilon"], rel=1e-5)


def test_markdown_table_has_the_epsilon_column(dp_swept):
    table = (dp_swept / "sweep.md").read_text()
    assert "| final epsilon (delta) |" in table and "inf: clipping without noise" in table
    eps = _final_privacy(dp_swept / RUNS["1.0", "fedper"])["epsilon"]
    lines = [line for line in table.splitlines() if line.startswith("| 1.0 | fedper |")]
    assert len(lines) == 1 and lines[0].endswith(f"| {eps:.2f} (delta 1e-05) |")
    assert any(line.startswith("| 0 | none |") and line.endswith("| inf (delta 1e-05) |") for line in table.splitlines())


def test_plot_has_one_line_per_method_with_no_noise_at_the_right(dp_swept, capsys):
    assert (dp_swept / "plots" / "accuracy_vs_epsilon.png").stat().st_size > 0
    from utils.sweep import aggregate, plan

    runs = plan(str(dp_swept.parent / "config.yaml"), [], [parse_axis(NOISE), parse_axis(METHOD)], 1)
    axes = [parse_axis(NOISE), parse_axis(METHOD)]
    rows = aggregate(dp_swept, runs)
    assert sorted(epsilon_series(rows, axes)) == ["method=fedper", "method=none"]
    ax = epsilon_figure(rows, axes, "dp").axes[0]
    labels = {c.get_label(): c for c in ax.containers}
    # FedAvg ("none") has no personalized model: global only; FedPer both
    assert sorted(labels) == ["method=fedper global", "method=fedper personalized", "method=none global"]
    for label, container in labels.items():
        x, y = container.lines[0].get_data()
        name = RUNS["1.0", label.split()[0].split("=")[1]]
        assert x[0] == pytest.approx(_final_privacy(dp_swept / name)["epsilon"], rel=1e-9)
        assert x[1] == pytest.approx(4 * x[0])  # no noise: right of the largest finite epsilon
        final = read_metrics(dp_swept / name)[-1]
        score = final["global_test_acc"] if label.endswith("global") else final["personalized"]["weighted_mean"]
        assert y[0] == pytest.approx(100 * score)
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "inf\n(no noise)"
    assert "delta 1e-05" in ax.get_title() and "personalized model" in ax.get_title()


def _row(noise: str, method: str, epsilon: float, glob: tuple, seeds: int = 3) -> dict:
    return {"point": (("privacy.noise_multiplier", noise), ("personalization.method", method)),
            "runs": [f"r{i}" for i in range(seeds)],
            "privacy": {"epsilon": epsilon, "delta": 1e-6, "mechanism": "gaussian"},
            "final_global": (*glob, seeds), "final_personalized": None}


def test_seeds_give_error_bars_of_the_sample_std():
    axes = [Axis("privacy.noise_multiplier", ("0", "2")), Axis("personalization.method", ("none",))]
    rows = [_row("0", "none", math.inf, (0.5, 0.02)), _row("2", "none", 0.3, (0.2, 0.05))]
    ax = epsilon_figure(rows, axes, "s").axes[0]
    (container,) = ax.containers
    assert container.get_label() == "method=none global (mean of 3 seeds, bars ± std)"
    assert list(container.lines[0].get_ydata()) == pytest.approx([20.0, 50.0])
    segments = container.lines[2][0].get_segments()
    assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([10.0, 4.0])  # 2 * std, in percent
    assert "(delta 1e-06, privacy.mechanism gaussian)" in ax.get_title()


def test_without_privacy_no_series_and_the_plot_is_refused():
    axes = [Axis("personalization.method", ("none",))]
    row = {**_row("0", "none", 1.0, (0.5, 0.0)), "privacy": None}
    assert epsilon_series([row], axes) == {}
    with pytest.raises(ValueError, match="report privacy"):
        epsilon_figure([row], axes, "s")


def test_a_grid_point_without_finished_runs_is_a_dash_not_no_dp():
    axes = [Axis("privacy.noise_multiplier", ("0", "2")), Axis("personalization.method", ("none",))]
    done = {**_row("0", "none", math.inf, (0.5, 0.0), seeds=1), "best_global": None, "best_personalized": None}
    failed = {**done, "point": (("privacy.noise_multiplier", "2"), ("personalization.method", "none")), "runs": [],
              "privacy": None, "final_global": None}
    lines = markdown_table([done, failed], axes).splitlines()
    assert lines[2].endswith("| inf (delta 1e-06) |") and lines[3] == "| 2 | none | 0 | - | - | - | - | - |"
    assert list(epsilon_series([done, failed], axes)) == ["method=none"]
