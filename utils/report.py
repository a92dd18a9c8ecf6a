"""What a run shows a person: the line per evaluation, the final table, summary.md, the plots, and
the words of its TensorBoard tags."""
from __future__ import annotations

from pathlib import Path

from core.evaluation import BEST_METRICS, COUNT, GLOBAL, GLOBAL_LOSS, LOSS_COUNT, PERSONAL, PERSONAL_LOSS
from core.files import write_text_atomic


# The words a record's figures go by, the same in the console line, summary.md and the TensorBoard /
# W&B scalar tags (record key -> words).
WORDS = {"train_loss": "train loss", "global_test_acc": "global test", "global_local": "global on clients",
         "personalized": "personalized", "global_on_personalized_clients": "global on personalized clients",
         "new_clients": "new clients", "global_on_new_clients": "global on new clients",
         "sec_per_round": "s/round", "elapsed_s": "wall time", "dropped_clients": "dropped updates",
         "global_local_loss": "global test loss", "personalized_loss": "personalized test loss"}
VAL_WORDS = {"global": "val global", "personalized": "val personalized", "global_loss": "val global loss",
             "personalized_loss": "val personalized loss"}
PERCENT = frozenset({"global_test_acc", "weighted_mean", "mean", "std", "p10", "p50", "p90"})  # shown as %


def record_scalars(record: dict) -> dict[str, float]:
    """The scalars of an evaluation record (as in metrics.jsonl) under the words of :data:`WORDS`:
    ``global test``, ``global on clients`` (its sample-weighted mean; ``global on clients/mean``,
    ``/std``, ``/p10`` ... ``/clients`` beside it), ``personalized``, ``val global``, ``train loss``,
    ``dropped updates``, ``best.pt/round`` and ``best.pt/value``, ...; accuracies in percent, as the
    console and summary.md show them. A key without words keeps its key path. None values and
    non-numbers (texts, lists) are left out."""
    out: dict[str, float] = {}

    def add(words: str, key: str, value, loss: bool = False) -> None:
        if isinstance(value, dict):
            for stat, v in value.items():
                add(words if stat == "weighted_mean" else f"{words}/{stat}", stat, v, loss)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[words] = 100 * value if key in PERCENT and not loss else value

    for key, value in record.items():
        if key == "round":
            continue
        if key == "val" and isinstance(value, dict):
            for part, v in value.items():
                add(VAL_WORDS.get(part, f"val {part}"), part, v)
        elif key == "dropped_clients" and isinstance(value, list):
            out[WORDS[key]] = sum(value)
        elif key == "best" and isinstance(value, dict):
            add("best.pt/round", "round", value.get("round"))
            accuracy = str(value.get("metric")).endswith("_acc")  # an accuracy in percent, a loss as it is
            add("best.pt/value", "global_test_acc" if accuracy else "value", value.get("value"))
        else:
            add(WORDS.get(key, key), key, value, key.endswith("_loss"))
    return out


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value) -> str:
    """A loss with 3 decimals; ``-`` for a missing (null) value."""
    return "-" if value is None else f"{value:.3f}"


def _mean_personal(rec: dict) -> bool:
    """Whether the record's global model carries the clients' mean personal layers."""
    return "mean of" in rec.get("global_model", "")


def format_line(rec: dict, rounds: int) -> str:
    """One compact console line for an evaluation record."""
    g = rec["global_local"]
    head = " (personal layers: clients' mean)" if _mean_personal(rec) else ""
    text = (f"round {rec['round']}/{rounds} | {WORDS['train_loss']} {_num(rec['train_loss'])} | global{head} test "
            f"{_pct(rec['global_test_acc'])}%"
            f" | {WORDS['global_local']} {_pct(g['weighted_mean'])}% (mean {_pct(g['mean'])} ± {_pct(g['std'])})")
    p = rec.get("personalized")
    if p and p.get("clients"):
        text += (f" | {WORDS['personalized']} {_pct(p['weighted_mean'])}% (mean {_pct(p['mean'])} ± "
                 f"{_pct(p['std'])}, {p['clients']} clients)")
    dropped = sum(rec.get("dropped_clients", []))
    if dropped:
        text += f" | {dropped} non-finite client updates dropped since the last evaluation"
    if rec.get("privacy"):
        text += f" | eps {_epsilon(rec['privacy'])} (delta {rec['privacy']['delta']:g})"
    return text + f" | {rec.get('sec_per_round', float('nan')):.2f} {WORDS['sec_per_round']} | {rec['elapsed_s']:.0f}s"


def _epsilon(privacy: dict) -> str:
    """A record's epsilon in 3 significant digits; ``inf`` for none (no noise: stored as null)."""
    eps = privacy.get("epsilon")
    return "inf" if eps is None or eps == float("inf") else f"{eps:.3g}"


def privacy_line(history: list[dict]) -> str:
    """One sentence on DP at the last evaluation (empty without DP): epsilon at delta after the rounds
    done, what it covers, and the mechanism's settings; plus a caveat when a central delta is not
    below 1 / population."""
    last = history[-1] if history else {}
    dp = last.get("privacy")
    if not dp:
        return ""
    share = "-" if dp.get("clipped_share") is None else f"{100 * dp['clipped_share']:.0f}%"
    settings = (f"{dp['accountant']} accountant; noise multiplier {dp['noise_multiplier']:.4g}, clip norm "
                f"{dp['clip_norm']:.4g}{' in the last round' if dp.get('mechanism') == 'adaptive_gaussian' else ''}")
    if dp.get("mechanism") == "local_gaussian":
        return (f"Local DP: epsilon {_epsilon(dp)} at delta {dp['delta']:g} after {last['round']} rounds for the client "
                f"that has sent the most updates ({dp['releases']}), for everything it sent, under replace-one "
                f"adjacency of its data ({settings}; {share} of client updates clipped since the evaluation before); "
                f"its personal layers and personalized model, and evaluation figures, are not covered.\n\n")
    adaptive = ", adaptive clipping" if dp.get("mechanism") == "adaptive_gaussian" else ""
    population = dp.get("population")
    caveat = (f" Delta {dp['delta']:g} is not below 1 / population (1/{population}): a guarantee at this delta still "
              f"allows one client's data to be published whole." if population and dp["delta"] >= 1 / population else "")
    return (f"Central DP (DP-FedAvg{adaptive}): epsilon {_epsilon(dp)} at delta {dp['delta']:g} after {last['round']} "
            f"rounds, for the sequence of global models under add/remove-one-client adjacency ({settings}, Poisson "
            f"sampling rate {dp['sampling_rate']:.4g}; {share} of client updates clipped since the evaluation "
            f"before); personal layers, personalized models and evaluation figures are not covered.{caveat}\n\n")


def results_table(rec: dict) -> str:
    """Markdown table of the accuracies (percent) of one evaluation record, one row per figure, named
    first by its words (:data:`WORDS`, as in the round line and TensorBoard), then described."""
    g = "global model (personal layers: clients' mean)" if _mean_personal(rec) else "global model"
    rows = [("global_test_acc", f"{g}, full test set", {"weighted_mean": rec["global_test_acc"]}),
            ("global_local", f"{g}, clients' local test splits", rec["global_local"])]
    if rec.get("personalized", {}).get("clients"):
        rows.append(("global_on_personalized_clients", f"{g}, trained clients only",
                     rec["global_on_personalized_clients"]))
        rows.append(("personalized", "personalized models, trained clients", rec["personalized"]))
    if rec.get("new_clients", {}).get("clients"):
        rows.append(("global_on_new_clients", f"{g}, never-trained clients", rec["global_on_new_clients"]))
        rows.append(("new_clients", "new-client models (personal layers fine-tuned)", rec["new_clients"]))
    lines = ["| figure | model, clients | weighted mean | mean | std | p10 | p50 | p90 | clients |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, name, s in rows:
        cells = [_pct(s.get(k)) for k in ("weighted_mean", "mean", "std", "p10", "p50", "p90")]
        lines.append(f"| {WORDS[key]} | {name} | " + " | ".join(cells) + f" | {s.get('clients', '-')} |")
    return "\n".join(lines)


def loss_table(rec: dict) -> str:
    """Markdown table of the test losses of one evaluation record (each client's mean per-sample
    loss, e.g. cross-entropy in nats), with exp(weighted mean), the perplexity of a cross-entropy
    loss; empty when the model reports no per-sample loss."""
    import math

    g = "global model (personal layers: clients' mean)" if _mean_personal(rec) else "global model"
    rows = [(k, name) for k, name in (("global_local_loss", f"{g}, clients' local test splits"),
                                      ("personalized_loss", "personalized models, trained clients"))
            if rec.get(k, {}).get("clients")]
    if not rows:
        return ""
    lines = ["| figure | model, clients | weighted mean | exp(weighted mean) | mean | std | p10 | p50 | p90 | clients |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, name in rows:
        s = rec[key]
        cells = [_num(s.get(k)) for k in ("mean", "std", "p10", "p50", "p90")]
        lines.append(f"| {WORDS[key]} | {name} | {_num(s['weighted_mean'])} | {math.exp(s['weighted_mean']):.2f} | "
                     + " | ".join(cells) + f" | {s['clients']} |")
    return "\n".join(lines)


def best_record(history: list[dict]) -> dict | None:
    """The evaluation record that chose checkpoints/best.pt (the last record's ``best`` round)."""
    chosen = history[-1].get("best") if history else None
    return next((r for r in history if chosen and r["round"] == chosen["round"]), None)


def _best_value(chosen: dict) -> tuple[str, str]:
    """(words for the metric, its value as shown: a loss with 3 decimals, an accuracy in percent) of a
    record's ``best``."""
    words = BEST_METRICS[chosen["metric"]][2]
    value = chosen["value"]
    return words, _num(value) if "loss" in chosen["metric"] else f"{_pct(value)}%"


def best_line(history: list[dict]) -> str:
    """One sentence: which round best.pt is and what chose it (the test set, when it was)."""
    if best_record(history) is None:
        return "No best.pt: no evaluation had a value of the best metric."
    chosen = history[-1]["best"]
    words, shown = _best_value(chosen)
    text = (f"checkpoints/best.pt is round {chosen['round']}, chosen by {words} ({chosen['metric']} = {shown}).")
    if chosen["metric"] == "global_test_acc":
        text += (" It was chosen on the test set itself, so its test figures are optimistic; set "
                 "data_config.val_fraction to choose on validation splits.")
    return text


def best_section(history: list[dict]) -> str:
    """What chose best.pt, and the test figures at that round."""
    best = best_record(history)
    table = f" Test figures at that round:\n\n{results_table(best)}" if best is not None else ""
    return best_line(history) + table


def personalization_gain(rec: dict, matrix=None, trained: list[int] | None = None) -> dict | None:
    """Personalized minus global accuracy on the same clients (the trained clients with a local test
    split) at the evaluation ``rec``, as fractions: ``mean`` over clients, ``p10`` (10th percentile
    of the per-client gains: the clients it helps least), ``weighted_mean`` (by test samples) and
    ``clients``. ``p10`` needs ``matrix`` ((num_clients, COLUMNS), that evaluation's, with
    ``trained``); without it ``p10`` is None and the means come from the record. None when the
    record has no personalized clients."""
    import numpy as np

    pers, glob = rec.get("personalized", {}), rec.get("global_on_personalized_clients", {})
    if not pers.get("clients") or not glob.get("clients"):
        return None
    if matrix is None:
        return {"mean": pers["mean"] - glob["mean"], "p10": None,
                "weighted_mean": pers["weighted_mean"] - glob["weighted_mean"], "clients": pers["clients"]}
    ids, global_acc, personal_acc = _client_accuracies(matrix, trained or [])
    mine = ~np.isnan(personal_acc)  # the trained clients with a local test split
    gain = personal_acc[mine] - global_acc[mine]
    return {"mean": float(gain.mean()), "p10": float(np.percentile(gain, 10)),
            "weighted_mean": float(np.average(gain, weights=matrix[ids[mine], COUNT])), "clients": int(mine.sum())}


def _points(value) -> str:
    """A difference of fractions in signed percentage points; ``-`` for None."""
    return "-" if value is None else f"{100 * value:+.2f}"


def gain_line(rec: dict, method: str, matrix=None, trained: list[int] | None = None) -> str:
    """One sentence: the personalization gain (:func:`personalization_gain`) at ``rec``, saying
    against which global model and on which clients it is measured."""
    gain = personalization_gain(rec, matrix, trained)
    if gain is None:
        return (f"Personalization gain: none measured (method {method} evaluates no personalized model, "
                f"or no client had trained by round {rec['round']}).")
    g = "global model (personal layers: clients' mean)" if _mean_personal(rec) else "global model"
    p10 = (f"p10 {_points(gain['p10'])}" if gain["p10"] is not None
           else "p10 - (no per-client figures for this round)")
    return (f"Personalization gain at round {rec['round']} (personalized minus {g}, on the same "
            f"{gain['clients']} trained clients' local test splits, percentage points): mean "
            f"{_points(gain['mean'])}, {p10}, sample-weighted {_points(gain['weighted_mean'])}.")


def best_choice_line(history: list[dict], config: dict) -> str:
    """One sentence: what chose checkpoints/best.pt (``server_config.best_metric`` on the clients'
    validation splits, or the test set itself when ``data_config.val_fraction`` is 0) and the round."""
    chosen = history[-1].get("best") if history else None
    asked = config.get("server_config", {}).get("best_metric", "?")
    fraction = config.get("data_config", {}).get("val_fraction", 0)
    if chosen is None or best_record(history) is None:
        return f"best.pt: none (no evaluation had a value of server_config.best_metric = {asked})."
    words, value = _best_value(chosen)
    if chosen["metric"] == "global_test_acc":
        return (f"best.pt: round {chosen['round']}, chosen by {words} on the test set itself "
                f"({value}): data_config.val_fraction is 0, so server_config.best_metric ({asked}) had no "
                f"validation split and the test figures at best.pt are optimistic.")
    return (f"best.pt: round {chosen['round']}, chosen by server_config.best_metric = {chosen['metric']} "
            f"({words}, {value}) on the clients' validation splits (data_config.val_fraction {fraction}).")


def summary_opening(run_name: str, history: list[dict], config: dict, task: str | None, wall_s: float,
                    matrix=None, trained: list[int] | None = None, stopped: str | None = None) -> str:
    """The first lines of summary.md: task, method, strategy and seed (then ``stopped``, why the run
    ended early, when it did); the personalization gain at the last evaluation; what chose best.pt."""
    last, pers = history[-1], config.get("personalization", {})
    method = pers.get("method", "?")
    layers = f" (personal layers: {', '.join(pers['local_layers'])})" if pers.get("local_layers") else ""
    rounds = config.get("server_config", {}).get("max_iteration", "?")
    note = f"**Stopped early**: {stopped}.\n\n" if stopped else ""
    return (f"# {run_name}\n\nTask {task or 'not recorded (no run.json)'}, method {method}{layers}, strategy "
            f"{config.get('strategy', '?')}, seed {config.get('seed', '?')}; round {last['round']} of {rounds}, "
            f"wall time {wall_s:.0f} s.\n\n{note}{gain_line(last, method, matrix, trained)}\n\n"
            f"{best_choice_line(history, config)}\n\n{privacy_line(history)}")


def write_summary(path: Path, run_name: str, history: list[dict], config_text: str, wall_s: float,
                  stopped: str | None = None, task: str | None = None, matrix=None,
                  trained: list[int] | None = None) -> None:
    """summary.md: first task, method, seed, the personalization gain and what chose best.pt
    (:func:`summary_opening`; ``matrix`` and ``trained``: the last evaluation's, for the gain's
    p10), then the final results table, per-round accuracies, and the resolved config
    (``config_text``, YAML); ``stopped``, when the run ended early (divergence), is stated first."""
    import yaml

    last = history[-1]
    columns = [WORDS[k] for k in ("train_loss", "global_test_acc", "global_local", "personalized")] + \
        [VAL_WORDS[k] for k in ("global", "personalized", "global_loss", "personalized_loss")] + [WORDS["dropped_clients"]]
    losses = any("global_local_loss" in r for r in history)  # the model reports per-sample test losses
    if losses:
        columns += [WORDS["global_local_loss"], WORDS["personalized_loss"]]
    per_round = ["| round | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in history:
        p, v = r.get("personalized", {}), r.get("val", {})
        per_round.append(f"| {r['round']} | {_num(r['train_loss'])} | {_pct(r['global_test_acc'])} | "
                         f"{_pct(r['global_local']['weighted_mean'])} | {_pct(p.get('weighted_mean'))} | "
                         f"{_pct(v.get('global', {}).get('weighted_mean'))} | "
                         f"{_pct(v.get('personalized', {}).get('weighted_mean'))} | "
                         f"{_num(v.get('global_loss'))} | {_num(v.get('personalized_loss'))} | "
                         f"{sum(r.get('dropped_clients', []))} |" +
                         (f" {_num(r.get('global_local_loss', {}).get('weighted_mean'))} | "
                          f"{_num(r.get('personalized_loss', {}).get('weighted_mean'))} |" if losses else ""))
    formed = f"The global model: {last['global_model']}.\n\n" if "global_model" in last else ""
    opening = summary_opening(run_name, history, yaml.safe_load(config_text) or {}, task, wall_s, matrix, trained,
                              stopped)
    table = loss_table(last)
    losses_text = (f"Test loss per client (the model's per-sample loss averaged over the client's local test split; "
                   f"weighted mean weights clients by test samples):\n\n{table}\n\n" if table else "")
    text = (f"{opening}## Final results\n\nAccuracies in percent; weighted mean weights clients by "
            f"test samples.\n\n{results_table(last)}\n\n{losses_text}{formed}"
            f"{best_section(history)}\n\n"
            f"## Per evaluation\n\n" + "\n".join(per_round) +
            f"\n\n## Config\n\n```yaml\n{config_text}```\n")
    write_text_atomic(path, text)


def integer_rounds(ax) -> None:
    """Round ticks on whole numbers only (a run of 4 rounds is not drawn at 2.5)."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def new_figure(width: float = 7, height: float = 4.5, columns: int = 1):
    """A matplotlib Figure with ``columns`` axes side by side, outside pyplot (no global backend or
    state: the figure is drawn to PNG by :func:`save_figure`). Returns (figure, axes)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, columns)


def save_figure(fig, path: Path) -> None:
    """Lay out and write ``fig`` as a PNG (folders made as needed)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def global_series_equal(history: list[dict]) -> bool:
    """Whether the global model's full-test accuracy equals its sample-weighted accuracy on the
    clients' local test splits at every evaluation: so by construction when the splits hold each test
    sample once (invariant 4), and then one line shows both."""
    pairs = [(r.get("global_test_acc"), r["global_local"].get("weighted_mean")) for r in history]
    return all(a is not None and b is not None and abs(a - b) <= 1e-9 for a, b in pairs)


def accuracy_figure(history: list[dict], title: str):
    """Figure of global (full test set, clients' splits) vs personalized accuracy per evaluation:
    markers on every point (one evaluation is a point, not an invisible line), whole-number round
    ticks, and one global line, said so in its label, when the two global series are equal."""
    fig, ax = new_figure()
    rounds = [r["round"] for r in history]
    g = "global model (personal layers: clients' mean)" if history and _mean_personal(history[-1]) else "global model"
    if global_series_equal(history):
        ax.plot(rounds, [100 * r["global_test_acc"] for r in history], "o-",
                label=f"{g}, full test set (= clients' test splits, sample-weighted)")
    else:
        ax.plot(rounds, [100 * _value(r.get("global_test_acc")) for r in history], "o-", label=f"{g}, full test set")
        ax.plot(rounds, [100 * _value(r["global_local"].get("weighted_mean")) for r in history], "s--",
                label=f"{g}, clients' test splits (sample-weighted)")
    if any(r.get("personalized", {}).get("clients") for r in history):
        ax.plot(rounds, [100 * _value(r.get("personalized", {}).get("weighted_mean")) for r in history], "^-",
                label="personalized models, trained clients' test splits (sample-weighted)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}: test accuracy per evaluation")
    integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _value(value) -> float:
    """A fraction from a record, NaN (a gap in the line) for a missing one."""
    return float("nan") if value is None else value


def plot_accuracy(path: Path, history: list[dict], title: str) -> None:
    """PNG of :func:`accuracy_figure`."""
    save_figure(accuracy_figure(history, title), path)


def _client_accuracies(matrix, trained: list[int]):
    """Per-client (ids, global accuracy, personalized accuracy or NaN) of clients with test data."""
    import numpy as np

    counts = matrix[:, COUNT]
    ids = np.flatnonzero(counts > 0)
    personal = np.full(len(matrix), np.nan)
    personal[trained] = matrix[trained, PERSONAL] / np.maximum(counts[trained], 1)
    return ids, matrix[ids, GLOBAL] / counts[ids], personal[ids]


def write_client_table(path: Path, matrix, trained: list[int]) -> None:
    """clients.csv: per client of the last evaluation, test samples, global and personalized accuracy
    (empty when the client never trained), and, when the model reports per-sample test losses, the
    global and personalized mean test loss."""
    ids, global_acc, personal_acc = _client_accuracies(matrix, trained)
    losses = matrix.shape[1] > LOSS_COUNT and bool((matrix[:, LOSS_COUNT] > 0).any())
    rows = ["client,test_samples,global_acc,personalized_acc" + (",global_loss,personalized_loss" if losses else "")]
    for cid, g, p in zip(ids, global_acc, personal_acc):
        row = f"{cid},{int(matrix[cid, 2])},{g:.6f},{'' if p != p else f'{p:.6f}'}"
        if losses:
            n = max(matrix[cid, LOSS_COUNT], 1)
            row += f",{matrix[cid, GLOBAL_LOSS] / n:.6f},{'' if p != p else f'{matrix[cid, PERSONAL_LOSS] / n:.6f}'}"
        rows.append(row)
    write_text_atomic(path, "\n".join(rows) + "\n")


def clients_figure(matrix, trained: list[int], title: str):
    """Figure of per-client accuracy at the last evaluation: left, histograms of the global and the
    personalized models; right, each trained client's personalized against its global accuracy
    (one point per client, the diagonal = no gain)."""
    import numpy as np

    _, global_acc, personal_acc = _client_accuracies(matrix, trained)
    fig, (hist, pairs) = new_figure(width=12, columns=2)
    bins = np.linspace(0, 100, 21)
    hist.hist(100 * global_acc, bins=bins, alpha=0.6, label=f"global model ({len(global_acc)} clients)")
    both = ~np.isnan(personal_acc)
    if both.any():
        hist.hist(100 * personal_acc[both], bins=bins, alpha=0.6, label=f"personalized ({int(both.sum())} clients)")
    hist.set_xlabel("accuracy on the client's local test split (%)")
    hist.set_ylabel("clients")
    hist.set_title("per-client accuracy")
    hist.legend(fontsize=8)
    pairs.plot([0, 100], [0, 100], ":", color="gray", label="no gain (personalized = global)")
    if both.any():
        gain = 100 * (personal_acc[both] - global_acc[both])
        pairs.plot(100 * global_acc[both], 100 * personal_acc[both], "o", alpha=0.7,
                   label=f"trained clients, one point each ({int(both.sum())}; above the line: {int((gain > 0).sum())})")
    pairs.set_xlabel("global model (%)")
    pairs.set_ylabel("personalized model (%)")
    pairs.set_xlim(0, 100)
    pairs.set_ylim(0, 100)
    pairs.set_aspect("equal")
    pairs.set_title("the same client: personalized vs global")
    pairs.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}: clients at the last evaluation")
    return fig


def plot_client_histogram(path: Path, matrix, trained: list[int], title: str) -> None:
    """PNG of :func:`clients_figure`: the histogram, and beside it the paired per-client plot."""
    save_figure(clients_figure(matrix, trained, title), path)
