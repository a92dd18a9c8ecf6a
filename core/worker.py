"""A worker rank: trains its share of each cohort and evaluates its share of clients."""
from __future__ import annotations

import torch

from core.cohort import balance
from core.evaluation import eval_share


def round_buffer_size(sim, round_idx: int) -> int:
    """Elements of a round's broadcast: global state (N) + cohort personal vectors (K x P)."""
    return sim.layout.numel + sim.schedule.cohort_size(round_idx) * sim.personal_numel


def contribution_size(sim, round_idx: int) -> int:
    """Elements of a round's reduce: delta sum (N), weight sum, weighted loss sum, K x P personal."""
    return sim.layout.numel + 2 + sim.schedule.cohort_size(round_idx) * sim.personal_numel


def train_share(sim, round_idx: int, round_buf: torch.Tensor) -> torch.Tensor:
    """Train this rank's clients of the round's cohort; return its (contribution_size,) vector.

    Holds the weighted sum of client deltas, the sum of client weights, the weighted sum of mean
    client losses, and each trained client's new personal vector in its cohort slot.
    """
    n, p = sim.layout.numel, sim.personal_numel
    cohort = sim.schedule.cohort(round_idx)
    sizes = sim.train_clients.sizes
    mine = balance(cohort, sizes[cohort], len(sim.ctx.workers))[sim.ctx.workers.index(sim.ctx.rank)]
    global_flat = round_buf[:n]
    slots = round_buf[n:].view(len(cohort), p)
    out = torch.zeros(contribution_size(sim, round_idx), device=sim.ctx.device)
    out_slots = out[n + 2:].view(len(cohort), p)
    slot_of = {int(c): i for i, c in enumerate(cohort)}
    if sim.vectorized is not None:
        _train_vectorized(sim, round_idx, mine, [slot_of[int(c)] for c in mine], global_flat, slots, out)
        return out
    weight_sum = 0.0
    for cid in mine:
        slot = slot_of[int(cid)]
        loss = sim.trainer.train(round_idx, int(cid), sim.train_clients.get(cid), global_flat,
                                 slots[slot] if p else None)
        weight = sim.strategy.client_weight(int(sizes[cid]))
        sim.layout.accumulate_(out[:n], weight)
        weight_sum += weight
        out[n + 1] += weight * loss
        if p:
            out_slots[slot] = sim.layout.flatten()[sim.personal_index]
    out[:n].add_(global_flat, alpha=-weight_sum)  # sum_i w_i (x_i - g) without a copy per client
    out[n] = weight_sum
    return out


def _train_vectorized(sim, round_idx, mine, mine_slots, global_flat, slots, out) -> None:
    """Vectorized variant of the client loop: groups of ``vectorize_chunk`` clients at once."""
    n, p, k = sim.layout.numel, sim.personal_numel, sim.layout.num_params
    chunk = sim.cfg.client_config.vectorize_chunk
    out_slots = out[n + 2:].view(len(slots), p)
    for start in range(0, len(mine), chunk):
        ids, rows = mine[start:start + chunk], mine_slots[start:start + chunk]
        personal = slots[rows] if p else None
        stack, losses = sim.vectorized.train_group(round_idx, ids, [sim.train_clients.get(c) for c in ids],
                                                   global_flat, personal, sim.personal_index)
        weights = torch.tensor([sim.strategy.client_weight(int(sim.train_clients.sizes[c])) for c in ids],
                               device=stack.device)
        out[:k] += weights @ stack - weights.sum() * global_flat[:k]
        out[n] += weights.sum()
        out[n + 1] += (weights * losses).sum()
        if p:
            full = torch.cat([stack, global_flat[k:].expand(len(ids), -1)], dim=1)
            out_slots[rows] = full[:, sim.personal_index]


def eval_buffer_size(sim, num_trained: int) -> int:
    return sim.layout.numel + num_trained * sim.personal_numel


def run_worker(sim) -> None:
    """Loop of a rank >= 1: receive the start round, then follow the schedule to the end."""
    start = int(sim.transport.broadcast(torch.zeros(1, device=sim.ctx.device), "start broadcast").item())
    trained = sim.schedule.trained_through(start - 1)
    for r in range(start, sim.schedule.rounds + 1):
        buf = sim.transport.broadcast(torch.empty(round_buffer_size(sim, r), device=sim.ctx.device),
                                      f"round {r} broadcast")
        sim.transport.reduce_sum(train_share(sim, r, buf), f"round {r} reduce")
        trained.update(sim.schedule.cohort(r).tolist())
        if sim.schedule.is_eval_round(r):
            ids = sorted(trained) if sim.personal_numel else []
            ebuf = sim.transport.broadcast(torch.empty(eval_buffer_size(sim, len(ids)), device=sim.ctx.device),
                                           f"round {r} eval broadcast")
            sim.transport.reduce_sum(eval_share(sim, ebuf, ids).view(-1), f"round {r} eval reduce")
