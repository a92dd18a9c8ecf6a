"""What a run shows a person (issue 26): the plots read at one evaluation, the paired per-client
plot, summary.md's opening, and the words of TensorBoard's tags. The figures are checked through
their matplotlib artists, before they are written."""
from __future__ import annotations

import numpy as np
import pytest

from core.evaluation import COLUMNS, COUNT, GLOBAL, PERSONAL
from utils.compare import compare_figure
from utils.report import accuracy_figure, clients_figure
from utils.sweep import mean_history


def _record(round_idx: int, test: float, local: float, personal: float | None = None) -> dict:
    rec = {"round": round_idx, "global_test_acc": test, "train_loss": 0.5, "elapsed_s": 1.0,
           "global_local": {"weighted_mean": local, "mean": local, "std": 0.0, "clients": 4}}
    if personal is not None:
        rec["personalized"] = {"weighted_mean": personal, "mean": personal, "std": 0.0, "clients": 3}
    return rec


def _lines(ax):
    """The data lines of an axes (not the helper lines of error bars)."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def _integer_ticks(ax) -> bool:
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low - 1e-9 <= t <= high + 1e-9]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_one_evaluation_is_drawn_with_markers_whole_rounds_and_one_global_line():
    """A run of 5 rounds with val_freq 5 has one evaluation: every series is a visible point."""
    fig = accuracy_figure([_record(5, 0.4, 0.4, 0.6)], "run")
    ax = fig.axes[0]
    lines = _lines(ax)
    assert all(line.get_marker() not in (None, "None", "", " ") for line in lines)
    labels = [line.get_label() for line in lines]
    assert len(labels) == 2, labels
    assert "full test set (= clients' test splits, sample-weighted)" in labels[0]
    assert labels[1].startswith("personalized")
    assert list(lines[0].get_ydata()) == [40.0] and list(lines[1].get_ydata()) == [60.0]
    assert "run" in ax.get_title() and _integer_ticks(ax)


def test_the_two_global_series_are_drawn_apart_when_they_differ():
    """A task whose own splits do not cover the test set: the two global figures differ, two lines."""
    ax = accuracy_figure([_record(2, 0.4, 0.45), _record(4, 0.5, 0.5)], "run").axes[0]
    labels = [line.get_label() for line in _lines(ax)]
    assert len(labels) == 2 and "full test set" in labels[0] and "clients' test splits" in labels[1]
    assert "=" not in labels[0]


def test_compare_plot_of_one_evaluation_has_markers_title_and_whole_rounds():
    runs = [{"name": "fedper", "history": [_record(3, 0.4, 0.4, 0.7)]},
            {"name": "fedavg", "history": [_record(3, 0.45, 0.45)]}]
    ax = compare_figure(runs, "two runs").axes[0]
    lines = _lines(ax)
    assert [line.get_label() for line in lines] == ["fedper global test", "fedper personalized", "fedavg global test"]
    assert all(line.get_marker() not in (None, "None", "", " ") for line in lines)
    assert ax.get_title() == "two runs" and _integer_ticks(ax)


def test_sweep_plot_draws_the_mean_over_seeds_with_a_band():
    seeds = [[_record(2, 0.40, 0.40, 0.60), _record(4, 0.50, 0.50, 0.70)],
             [_record(2, 0.44, 0.44, 0.64), _record(4, 0.56, 0.56, 0.74)]]
    history = mean_history(seeds)
    assert history[1]["global_test_acc"] == pytest.approx(0.53)
    assert history[1]["global_test_std"] == pytest.approx(np.std([0.50, 0.56], ddof=1))
    ax = compare_figure([{"name": "lr=0.1", "history": history}], "sweep").axes[0]
    lines = _lines(ax)
    assert lines[0].get_label() == "lr=0.1 global test (mean of 2 seeds, band ± std)"
    assert list(lines[0].get_ydata()) == pytest.approx([42.0, 53.0])
    bands = ax.collections
    assert len(bands) == 2, "one band per series"
    top = bands[0].get_paths()[0].vertices[:, 1]
    std = 100 * np.std([0.50, 0.56], ddof=1)
    assert top.max() == pytest.approx(53.0 + std) and top.min() == pytest.approx(42.0 - 100 * np.std([0.40, 0.44], ddof=1))
    single = compare_figure([{"name": "x", "history": mean_history([s[:1] for s in seeds])}], "sweep").axes[0]
    assert all(line.get_marker() not in (None, "None", "", " ") for line in _lines(single))
    assert single.containers, "one evaluation: the seeds' spread as error bars"


def test_clients_plot_pairs_each_clients_global_and_personalized_accuracy():
    matrix = np.zeros((5, COLUMNS))
    matrix[:, COUNT] = [10, 20, 10, 0, 5]
    matrix[:, GLOBAL] = [5, 10, 2, 0, 4]
    matrix[:, PERSONAL] = [8, 9, 9, 0, 0]
    fig = clients_figure(matrix, trained=[0, 1, 2], title="run")
    hist, pairs = fig.axes
    assert hist.patches, "the histogram stays"
    points = [line for line in _lines(pairs) if line.get_linestyle() == "None"]
    assert len(points) == 1
    xy = sorted(zip(points[0].get_xdata(), points[0].get_ydata()))
    assert np.allclose(xy, sorted([(50.0, 80.0), (50.0, 45.0), (20.0, 90.0)])), "clients 0, 1, 2: (global, personalized)"
    assert "3" in points[0].get_label() and "above the line: 2" in points[0].get_label()
    assert "run" in fig._suptitle.get_text()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A real 4-round FedPer run of the synthetic task, evaluated at rounds 2 and 4, with validation splits."""
    import e2e_trainer

    out = tmp_path_factory.mktemp("report")
    argv = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic",
            "-outputPath", str(out), "-run_name", "small", "-seed", "3", "--set", "server_config.max_iteration=4",
            "--set", "server_config.val_freq=2", "--set", "data_config.val_fraction=0.2"]
    assert e2e_trainer.main(argv) == 0
    return out / "small"


def test_summary_opens_with_task_method_seed_gain_and_how_best_was_chosen(small_run):
    import csv

    from testing.conftest import read_metrics

    text = (small_run / "summary.md").read_text()
    head = text.split("## Final results")[0]
    assert head.startswith("# small\n\nTask synthetic, method fedper (personal layers: linear), strategy fedavg, "
                           "seed 3; round 4 of 4")
    rows = [r for r in csv.DictReader(open(small_run / "clients.csv")) if r["personalized_acc"]]
    gain = np.array([float(r["personalized_acc"]) - float(r["global_acc"]) for r in rows])
    weights = np.array([float(r["test_samples"]) for r in rows])
    assert (f"Personalization gain at round 4 (personalized minus global model (personal layers: clients' mean), "
            f"on the same {len(rows)} trained clients' local test splits, percentage points): "
            f"mean {100 * gain.mean():+.2f}, p10 {100 * np.percentile(gain, 10):+.2f}, "
            f"sample-weighted {100 * np.average(gain, weights=weights):+.2f}.") in head
    best = read_metrics(small_run)[-1]["best"]
    assert best["metric"] == "val_global_acc"
    assert (f"best.pt: round {best['round']}, chosen by server_config.best_metric = val_global_acc (validation "
            f"accuracy of the global model, {100 * best['value']:.2f}%) on the clients' validation splits "
            f"(data_config.val_fraction 0.2).") in head


def test_summary_opening_says_when_best_rests_on_the_test_set_and_when_no_gain_is_measured():
    from utils.report import summary_opening

    history = [_record(2, 0.4, 0.4)]
    history[-1]["best"] = {"metric": "global_test_acc", "round": 2, "value": 0.4}
    config = {"strategy": "fedavg", "seed": 0, "personalization": {"method": "none", "local_layers": []},
              "server_config": {"best_metric": "val_global_acc", "max_iteration": 2}, "data_config": {"val_fraction": 0}}
    opening = summary_opening("r", history, config, None, 1.0)
    assert opening.startswith("# r\n\nTask not recorded (no run.json), method none, strategy fedavg, seed 0;")
    assert "Personalization gain: none measured (method none evaluates no personalized model" in opening
    assert ("best.pt: round 2, chosen by global test accuracy on the test set itself (40.00%): "
            "data_config.val_fraction is 0, so server_config.best_metric (val_global_acc) had no validation split "
            "and the test figures at best.pt are optimistic.") in opening


def test_tensorboard_tags_are_the_words_of_the_round_line_and_summary(small_run):
    """Each TensorBoard tag's words (before any /mean, /p10 ...) appear in the round line or in
    summary.md, and its value is the one printed there (accuracies in percent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from testing.conftest import read_metrics
    from utils.report import format_line

    events = EventAccumulator(str(small_run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train loss", "global test", "global on clients", "personalized", "val global", "val personalized",
            "dropped updates", "s/round", "global on clients/p10", "personalized/mean", "best.pt/round"} <= tags
    last = read_metrics(small_run)[-1]
    printed = format_line(last, 4) + (small_run / "summary.md").read_text()
    for tag in tags:
        words = tag.split("/")[0] if not tag.startswith("s/") else tag
        assert words in printed, f"tag {tag!r}: {words!r} is shown nowhere"
    at_4 = {tag: events.Scalars(tag)[-1] for tag in tags}
    assert all(e.step == 4 for e in at_4.values())
    assert at_4["global test"].value == pytest.approx(100 * last["global_test_acc"], abs=1e-4)
    assert at_4["personalized"].value == pytest.approx(100 * last["personalized"]["weighted_mean"], abs=1e-4)
    assert at_4["personalized/p10"].value == pytest.approx(100 * last["personalized"]["p10"], abs=1e-4)
    assert at_4["train loss"].value == pytest.approx(last["train_loss"], abs=1e-6)
    assert at_4["best.pt/value"].value == pytest.approx(100 * last["best"]["value"], abs=1e-4)
    assert f"global test {100 * last['global_test_acc']:.2f}%" in format_line(last, 4).replace(
        " (personal layers: clients' mean) test", " test")
    assert "| train loss " in format_line(last, 4)
