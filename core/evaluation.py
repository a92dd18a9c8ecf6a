"""Global vs personalized evaluation on clients' local test splits, and summary statistics."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.cohort import balance
from core.local_run import epochs_of
from core.messages import Message, eval_broadcast, eval_reduce

GLOBAL, PERSONAL, COUNT, NEW = 0, 1, 2, 3  # on the clients' local test splits
# on the clients' validation splits (data_config.val_fraction): correct counts, samples, loss sums
VAL_GLOBAL, VAL_PERSONAL, VAL_COUNT, VAL_GLOBAL_LOSS, VAL_PERSONAL_LOSS = 4, 5, 6, 7, 8
# on the local test splits, when the model's inference returns a per-sample ``loss``: summed losses of the
# global and the personalized model, and the test samples whose loss was measured (0: the model reports none)
GLOBAL_LOSS, PERSONAL_LOSS, LOSS_COUNT = 9, 10, 11
COLUMNS = 12


@torch.no_grad()
def correct_count(model, loader, indices: torch.Tensor, prepare=lambda batch: batch) -> torch.Tensor:
    """Number of correct predictions (0-dim float tensor) of ``model`` over samples ``indices``.

    ``prepare`` adapts each batch (memory format) before ``model.inference``; evaluation is fp32.
    """
    return test_counts(model, loader, indices, prepare)[0]


@torch.no_grad()
def test_counts(model, loader, indices: torch.Tensor, prepare=lambda batch: batch) -> torch.Tensor:
    """(3,) float tensor over samples ``indices``: correct predictions, the summed per-sample loss
    and the samples whose loss was measured (both 0 when ``inference`` returns no ``loss``)."""
    model.eval()
    total = torch.zeros(3, device=indices.device)
    for batch in loader.batches(indices):
        out = model.inference(prepare(batch))
        total[0] += out["acc"] * out["batch_size"]
        if "loss" in out:
            total[1] += out["loss"].detach().float().sum()
            total[2] += out["loss"].numel()
    return total


@torch.no_grad()
def batched_counts(model, loader, clients: np.ndarray, index, prepare) -> torch.Tensor | None:
    """:func:`test_counts` per client, (len(clients), 3), from ONE pass over their concatenated
    samples. Needs ``inference`` to return the optional per-sample ``correct`` (B,) tensor (and
    ``loss`` (B,) for the loss columns); returns None without ``correct`` (callers then evaluate
    client by client)."""
    if len(clients) == 0:
        return torch.zeros(0, 3, device=index.flat.device)
    indices = torch.cat([index.get(c) for c in clients])
    owner = torch.repeat_interleave(torch.arange(len(clients), device=indices.device),
                                    torch.as_tensor(index.sizes[clients], device=indices.device))
    model.eval()
    parts = []
    for batch in loader.batches(indices):
        out = model.inference(prepare(batch))
        if "correct" not in out:
            return None
        correct = out["correct"].float()
        loss = out["loss"].detach().float() if "loss" in out else torch.zeros_like(correct)
        parts.append(torch.stack([correct, loss, torch.full_like(correct, float("loss" in out))], 1))
    return torch.zeros(len(clients), 3, device=indices.device).index_add_(0, owner, torch.cat(parts))


def global_for_evaluation(sim, global_flat: torch.Tensor, personal_rows: torch.Tensor | None,
                          trained: list[int]) -> tuple[torch.Tensor, str]:
    """The global model that evaluation reports, (N,), and a phrase saying how it was formed.

    For a method with personal layers (FedPer, FedRep, LG-FedAvg, FedBN: ``personal_numel`` > 0)
    the global copy of a personal layer never trains, so it still holds its initial weights. The
    evaluated global model therefore takes, at the personal positions, the mean of the trained
    clients' own personal layers weighted by their train samples; ``personal_rows`` is (T, P), the
    personal layers of the clients ``trained`` (T of them), in that order (None when none trained).
    This is for evaluation only: clients keep their own layers, and the aggregated global model (checkpoints' ``global``)
    is unchanged. Without personal layers, or before any client trained, ``global_flat`` itself.
    """
    if not sim.personal_numel:
        return global_flat, "as aggregated"
    if not trained or personal_rows is None:
        return global_flat, "shared layers as aggregated, personal layers at their initial values (no client trained)"
    sizes = torch.as_tensor(sim.train_clients.sizes[trained], dtype=torch.float64, device=personal_rows.device)
    mean = (sizes @ personal_rows.double()) / sizes.sum()
    evaluated = global_flat.clone()
    evaluated[sim.personal_index] = mean.to(global_flat.dtype)
    return evaluated, (f"shared layers as aggregated, personal layers the train-sample-weighted mean of "
                       f"{len(trained)} trained clients' own")


@torch.no_grad()
def correct_and_loss(model, loader, indices: torch.Tensor, prepare=lambda batch: batch) -> torch.Tensor:
    """(2,) float tensor: correct predictions and summed loss (``model.loss`` times batch size) of
    ``model`` over samples ``indices`` (a validation split)."""
    model.eval()
    total = torch.zeros(2, device=indices.device)
    for batch in loader.batches(indices):
        batch = prepare(batch)
        out = model.inference(batch)
        total[0] += out["acc"] * out["batch_size"]
        total[1] += model.loss(batch).detach().float() * out["batch_size"]
    return total


def eval_width(sim) -> int:
    """Floats per trained client in an evaluation broadcast (personal layers, or Ditto's model)."""
    return sim.rows.eval_width


def eval_messages(sim, num_trained: int) -> tuple[Message, Message]:
    """An evaluation's two messages (:mod:`core.messages`), declared alike on every rank: the
    broadcast (global state (N,) | ``num_trained`` stored vectors of :func:`eval_width` | control)
    and the reduce ((num_clients, COLUMNS) float32 counts, :func:`share_of_evaluation`'s matrix)."""
    return (eval_broadcast(sim.layout.numel, num_trained, eval_width(sim)),
            eval_reduce(len(sim.test_clients.sizes), COLUMNS))


def share_of_evaluation(sim, round_idx: int, global_flat: torch.Tensor, personal: torch.Tensor,
                        trained: list[int]) -> torch.Tensor:
    """This rank's part of a client evaluation, as a (num_clients, COLUMNS) float32 matrix to be
    sum-reduced (the ``matrix`` part of :func:`eval_messages`' reduce, which it is allocated from).

    Columns: correct predictions of the global model; of the personalized model (clients in
    ``trained`` only, prepared by the personalization method); test samples; and of the new-client
    model (never-trained clients, when ``personalization.new_client_epochs`` > 0); then the
    validation columns, and the summed test losses of the global and personalized models with the
    samples they cover (when ``inference`` returns a per-sample ``loss``). ``global_flat``
    is the (N,) global state, ``personal`` the (len(trained), :func:`eval_width`) personal vectors
    of ``trained`` in order.
    """
    sizes = sim.test_clients.sizes + (sim.val_clients.sizes if sim.val_clients is not None else 0)
    reduce = eval_messages(sim, len(trained))[1]
    result = reduce.view(reduce.zeros(sim.ctx.device), "matrix")
    with_data = np.flatnonzero(sizes)
    mine = balance(with_data, sizes[with_data], len(sim.ctx.workers))[sim.ctx.workers.index(sim.ctx.rank)]
    sizes = sim.test_clients.sizes
    sim.trainer.load(global_flat, None)
    _validate(sim, mine, result, VAL_GLOBAL, VAL_GLOBAL_LOSS)
    counts = batched_counts(sim.model, sim.test_loader, mine, sim.test_clients, sim.trainer.prepare)
    if counts is None:
        counts = torch.stack([test_counts(sim.model, sim.test_loader, sim.test_clients.get(c), sim.trainer.prepare)
                              for c in mine]) if len(mine) else torch.zeros(0, 3, device=sim.ctx.device)
    rows = torch.as_tensor(mine, device=sim.ctx.device)
    result[rows, GLOBAL], result[rows, GLOBAL_LOSS], result[rows, LOSS_COUNT] = counts[:, 0], counts[:, 1], counts[:, 2]
    result[rows, COUNT] = torch.as_tensor(sizes[mine], dtype=torch.float32, device=sim.ctx.device)
    if sim.personalization.evaluates_personalized:
        width = eval_width(sim)
        row = {c: i for i, c in enumerate(trained)}
        for cid in (int(c) for c in mine if int(c) in row):
            sim.personalization.prepare_eval(sim.trainer, round_idx, cid, sim.train_clients.get(cid), global_flat,
                                             personal[row[cid]] if width else None)
            counts = test_counts(sim.model, sim.test_loader, sim.test_clients.get(cid), sim.trainer.prepare)
            result[cid, PERSONAL], result[cid, PERSONAL_LOSS] = counts[0], counts[1]
            _validate(sim, [cid], result, VAL_PERSONAL, VAL_PERSONAL_LOSS)
    _new_clients(sim, round_idx, global_flat, [int(c) for c in mine if int(c) not in set(trained)], result)
    return result


def _validate(sim, clients, result: torch.Tensor, correct_col: int, loss_col: int) -> None:
    """Correct counts and loss sums of the replica's model on ``clients``' validation splits (none
    without ``data_config.val_fraction``)."""
    if sim.val_clients is None:
        return
    for cid in clients:
        if sim.val_clients.sizes[cid]:
            counts = correct_and_loss(sim.model, sim.val_loader, sim.val_clients.get(cid), sim.trainer.prepare)
            result[cid, correct_col], result[cid, loss_col] = counts[0], counts[1]
            result[cid, VAL_COUNT] = float(sim.val_clients.sizes[cid])


def _new_clients(sim, round_idx: int, global_flat: torch.Tensor, clients: list[int], result: torch.Tensor) -> None:
    """Never-trained clients: fine-tune the personal layers from the global model for
    ``new_client_epochs`` epochs on the client's train split (the rest frozen), then evaluate."""
    if not sim.cfg.personalization.new_client_epochs or not sim.personal_numel:
        return
    for cid in clients:
        fine_tune_new_client(sim, round_idx, global_flat, cid)
        result[cid, NEW] = correct_count(sim.model, sim.test_loader, sim.test_clients.get(cid), sim.trainer.prepare)


def fine_tune_new_client(sim, round_idx: int, global_flat: torch.Tensor, cid: int) -> None:
    """Leave in the replica a never-trained client's model: the global model with its personal layers
    fine-tuned ``personalization.new_client_epochs`` epochs on its train split (the rest frozen)."""
    sim.trainer.train(round_idx, cid, sim.train_clients.get(cid), global_flat, None,
                      epochs_of(sim.cfg.personalization.new_client_epochs, "personal", stream=2))


def full_test_accuracy(sim, global_flat: torch.Tensor) -> float:
    """Accuracy of the global model on the whole test split, from its own pass over every sample."""
    sim.trainer.load(global_flat, None)
    num = len(sim.test_loader.dataset.labels)
    return float(correct_count(sim.model, sim.test_loader, torch.arange(num, device=sim.ctx.device),
                        sim.trainer.prepare)) / num


def global_test_accuracy(sim, global_flat: torch.Tensor, matrix: np.ndarray) -> float:
    """Accuracy of the global model on the whole test split.

    When the clients' local test splits hold every test sample exactly once (the built-in
    partitioners guarantee it), this is the pooled count of the evaluation ``matrix``
    ((num_clients, COLUMNS), from :func:`share_of_evaluation`, reduced over ranks): the same predictions, so
    no second pass over the test set. Otherwise (a task's own split plan) the global model makes
    its own pass (:func:`full_test_accuracy`).
    """
    if sim.test_clients.partitions(len(sim.test_loader.dataset.labels)):
        return float(matrix[:, GLOBAL].sum() / matrix[:, COUNT].sum())
    return full_test_accuracy(sim, global_flat)


def evaluation_record(sim, global_flat: torch.Tensor, matrix: np.ndarray, trained: list[int]) -> dict:
    """The accuracy keys of a metrics.jsonl record: ``global_test_acc`` and the :func:`summarize`
    statistics of the reduced evaluation ``matrix`` ((num_clients, COLUMNS) float64)."""
    record = {"global_test_acc": global_test_accuracy(sim, global_flat, matrix)}
    record.update(summarize(matrix, trained, sim.personalization.evaluates_personalized))
    return record


def client_stats(acc: np.ndarray, weights: np.ndarray) -> dict:
    """Sample-weighted mean, mean, std and 10/50/90th percentiles of per-client accuracies."""
    if len(acc) == 0:
        return {"clients": 0}
    p10, p50, p90 = np.percentile(acc, [10, 50, 90])
    return {"weighted_mean": float(np.average(acc, weights=weights)), "mean": float(acc.mean()),
            "std": float(acc.std()), "p10": float(p10), "p50": float(p50), "p90": float(p90),
            "clients": int(len(acc))}


def _validation_stats(matrix: np.ndarray, trained: list[int], has_personal: bool) -> dict:
    """Global (every client with a validation split) and personalized (trained clients) accuracy on
    the validation splits, and their sample-weighted mean losses (``*_loss``)."""
    counts = matrix[:, VAL_COUNT]
    has = counts > 0
    out = {"global": client_stats(matrix[has, VAL_GLOBAL] / counts[has], counts[has]),
           "global_loss": float(matrix[has, VAL_GLOBAL_LOSS].sum() / counts[has].sum())}
    sel = np.zeros(len(counts), bool)
    sel[trained] = True
    sel &= has
    if has_personal and sel.any():
        out["personalized"] = client_stats(matrix[sel, VAL_PERSONAL] / counts[sel], counts[sel])
        out["personalized_loss"] = float(matrix[sel, VAL_PERSONAL_LOSS].sum() / counts[sel].sum())
    return out


# what chooses checkpoints/best.pt: server_config.best_metric -> (key path in a record, higher is better, words)
BEST_METRICS = {
    "val_global_acc": (("val", "global", "weighted_mean"), True, "validation accuracy of the global model"),
    "val_personalized_acc": (("val", "personalized", "weighted_mean"), True,
                             "validation accuracy of the personalized models"),
    "val_global_loss": (("val", "global_loss"), False, "validation loss of the global model"),
    "val_personalized_loss": (("val", "personalized_loss"), False, "validation loss of the personalized models"),
    "global_test_acc": (("global_test_acc",), True, "global test accuracy"),
}


def best_metric(cfg) -> str:
    """The metric that chooses best.pt: ``server_config.best_metric``, or ``global_test_acc`` when
    there is no validation split (``data_config.val_fraction`` 0)."""
    return cfg.server_config.best_metric if cfg.data_config.val_fraction > 0 else "global_test_acc"


def metric_value(record: dict, metric: str) -> float | None:
    """The record's value of ``metric`` (None when it has none, e.g. no personalized clients yet)."""
    value: Any = record
    for key in BEST_METRICS[metric][0]:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def improves(record: dict, history: list[dict], metric: str) -> bool:
    """Whether ``record`` is strictly better on ``metric`` than every earlier record of ``history``
    (a record without a value never is; the first record with one always is)."""
    value = metric_value(record, metric)
    if value is None:
        return False
    higher = BEST_METRICS[metric][1]
    earlier = [v for v in (metric_value(h, metric) for h in history) if v is not None]
    return all(value > v if higher else value < v for v in earlier)


def summarize(matrix: np.ndarray, trained: list[int], has_personal: bool) -> dict:
    """Statistics of global (all clients) and personalized (trained clients) accuracy; with
    validation splits, ``val`` holds the same on them plus sample-weighted mean losses. When the
    model reports per-sample test losses, ``global_local_loss`` and ``personalized_loss`` are the
    :func:`client_stats` of each client's mean test loss (e.g. cross-entropy in nats per sample)."""
    counts = matrix[:, COUNT]
    has = counts > 0
    out = {"global_local": client_stats(matrix[has, GLOBAL] / counts[has], counts[has])}
    measured = matrix[:, LOSS_COUNT] > 0
    if measured.any():
        n = matrix[measured, LOSS_COUNT]
        out["global_local_loss"] = client_stats(matrix[measured, GLOBAL_LOSS] / n, n)
        mine = np.zeros(len(counts), bool)
        mine[trained] = True
        mine &= measured
        if has_personal and mine.any():
            n = matrix[mine, LOSS_COUNT]
            out["personalized_loss"] = client_stats(matrix[mine, PERSONAL_LOSS] / n, n)
    if matrix[:, VAL_COUNT].sum() > 0:
        out["val"] = _validation_stats(matrix, trained, has_personal)
    if has_personal:
        sel = np.zeros(len(counts), bool)
        sel[trained] = True
        sel &= has
        out["personalized"] = client_stats(matrix[sel, PERSONAL] / counts[sel], counts[sel])
        out["global_on_personalized_clients"] = client_stats(matrix[sel, GLOBAL] / counts[sel], counts[sel])
        new = has.copy()
        new[trained] = False
        if matrix[new, NEW].sum() > 0:
            out["new_clients"] = client_stats(matrix[new, NEW] / counts[new], counts[new])
            out["global_on_new_clients"] = client_stats(matrix[new, GLOBAL] / counts[new], counts[new])
    return out
