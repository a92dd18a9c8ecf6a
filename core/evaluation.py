"""Global vs personalized evaluation on clients' local test splits, and summary statistics."""
from __future__ import annotations

import numpy as np
import torch

from core.cohort import balance

GLOBAL, PERSONAL, COUNT, NEW = 0, 1, 2, 3
COLUMNS = 4


@torch.no_grad()
def correct_count(model, loader, indices: torch.Tensor, prepare=lambda batch: batch) -> torch.Tensor:
    """Number of correct predictions (0-dim float tensor) of ``model`` over samples ``indices``.

    ``prepare`` adapts each batch (memory format) before ``model.inference``; evaluation is fp32.
    """
    model.eval()
    total = torch.zeros((), device=indices.device)
    for batch in loader.batches(indices):
        out = model.inference(prepare(batch))
        total += out["acc"] * out["batch_size"]
    return total


@torch.no_grad()
def batched_correct(model, loader, clients: np.ndarray, index, prepare) -> torch.Tensor | None:
    """Correct predictions per client (len(clients),) from ONE pass over their concatenated samples.

    Needs ``inference`` to return the optional per-sample ``correct`` (B,) tensor; returns None
    otherwise (callers then evaluate client by client).
    """
    if len(clients) == 0:
        return torch.zeros(0, device=index.flat.device)
    indices = torch.cat([index.get(c) for c in clients])
    owner = torch.repeat_interleave(torch.arange(len(clients), device=indices.device),
                                    torch.as_tensor(index.sizes[clients], device=indices.device))
    model.eval()
    parts = []
    for batch in loader.batches(indices):
        out = model.inference(prepare(batch))
        if "correct" not in out:
            return None
        parts.append(out["correct"].float())
    return torch.zeros(len(clients), device=indices.device).index_add_(0, owner, torch.cat(parts))


def global_for_evaluation(sim, global_flat: torch.Tensor, personal_rows: torch.Tensor,
                          trained: list[int]) -> tuple[torch.Tensor, str]:
    """The global model that evaluation reports, (N,), and a phrase saying how it was formed.

    For a method with personal layers (FedPer, FedRep, LG-FedAvg, FedBN: ``personal_numel`` > 0)
    the global copy of a personal layer never trains, so it still holds its initial weights. The
    evaluated global model therefore takes, at the personal positions, the mean of the trained
    clients' own personal layers weighted by their train samples; ``personal_rows`` is (T, P), the
    personal layers of the clients ``trained`` (T of them), in that order. This is for evaluation
    only: clients keep their own layers, and the aggregated global model (checkpoints' ``global``)
    is unchanged. Without personal layers, or before any client trained, ``global_flat`` itself.
    """
    if not sim.personal_numel:
        return global_flat, "as aggregated"
    if not trained:
        return global_flat, "shared layers as aggregated, personal layers at their initial values (no client trained)"
    sizes = torch.as_tensor(sim.train_clients.sizes[trained], dtype=torch.float64, device=personal_rows.device)
    mean = (sizes @ personal_rows.double()) / sizes.sum()
    evaluated = global_flat.clone()
    evaluated[sim.personal_index] = mean.to(global_flat.dtype)
    return evaluated, (f"shared layers as aggregated, personal layers the train-sample-weighted mean of "
                       f"{len(trained)} trained clients' own")


def eval_width(sim) -> int:
    """Floats per trained client in an evaluation broadcast (personal layers, or Ditto's model)."""
    return sim.personalization.model_state_numel(sim.layout) or sim.personal_numel


def eval_share(sim, round_idx: int, eval_buf: torch.Tensor, trained: list[int]) -> torch.Tensor:
    """This rank's part of a client evaluation, as a (num_clients, COLUMNS) matrix to be sum-reduced.

    Columns: correct predictions of the global model; of the personalized model (clients in
    ``trained`` only, prepared by the personalization method); test samples; and of the new-client
    model (never-trained clients, when ``personalization.new_client_epochs`` > 0). ``eval_buf`` holds
    the global state (N,) followed by the personal vectors (len(trained), P) of ``trained`` in order.
    """
    n = sim.layout.numel
    sizes = sim.test_clients.sizes
    result = torch.zeros(len(sizes), COLUMNS, device=sim.ctx.device)
    with_data = np.flatnonzero(sizes)
    mine = balance(with_data, sizes[with_data], len(sim.ctx.workers))[sim.ctx.workers.index(sim.ctx.rank)]
    global_flat = eval_buf[:n]
    sim.trainer.load(global_flat, None)
    correct = batched_correct(sim.model, sim.test_loader, mine, sim.test_clients, sim.trainer.prepare)
    if correct is None:
        correct = torch.stack([correct_count(sim.model, sim.test_loader, sim.test_clients.get(c), sim.trainer.prepare)
                               for c in mine]) if len(mine) else torch.zeros(0, device=sim.ctx.device)
    rows = torch.as_tensor(mine, device=sim.ctx.device)
    result[rows, GLOBAL] = correct
    result[rows, COUNT] = torch.as_tensor(sizes[mine], dtype=torch.float32, device=sim.ctx.device)
    if sim.personalization.evaluates_personalized:
        width = eval_width(sim)
        personal = eval_buf[n:].view(len(trained), width)
        row = {c: i for i, c in enumerate(trained)}
        for cid in (int(c) for c in mine if int(c) in row):
            sim.personalization.prepare_eval(sim.trainer, round_idx, cid, sim.train_clients.get(cid), global_flat,
                                             personal[row[cid]] if width else None)
            result[cid, PERSONAL] = correct_count(sim.model, sim.test_loader, sim.test_clients.get(cid),
                                                  sim.trainer.prepare)
    _new_clients(sim, round_idx, global_flat, [int(c) for c in mine if int(c) not in set(trained)], result)
    return result


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
                      epochs=sim.cfg.personalization.new_client_epochs, stream=2, which="personal")


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
    ((num_clients, COLUMNS), from :func:`eval_share`, reduced over ranks): the same predictions, so
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


def summarize(matrix: np.ndarray, trained: list[int], has_personal: bool) -> dict:
    """Statistics of global (all clients) and personalized (trained clients) accuracy."""
    counts = matrix[:, COUNT]
    has = counts > 0
    out = {"global_local": client_stats(matrix[has, GLOBAL] / counts[has], counts[has])}
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
