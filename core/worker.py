"""A worker rank: trains its share of each cohort and evaluates its share of clients."""
from __future__ import annotations

import torch

from core.cohort import balance
from core.distributed import host_to_device
from core.evaluation import eval_share, eval_width
from core.flat import keep_rows_if_finite_


GO, STOP = 1.0, 0.0  # the control value that ends every broadcast of a round or an evaluation


class RoundLayout:
    """Offsets of one round's two messages.

    Broadcast: global state (N) | server strategy state (S) | K cohort slots of width P + C + M |
    control (1: GO, or STOP when the server ends the run early). Reduce: weighted delta sum (N) |
    weight sum | weighted loss sum | summed change of the client strategy states (C, only when
    S > 0) | K slots | K dropped flags. A slot holds a client's personal layers (P), its strategy
    state (C) and its separate personal model (M, Ditto); the rank that trains a client fills its
    slot, and sets its dropped flag to 1 when the client's update was not finite (it is then left
    out of every sum, and its slot is not stored).
    """

    def __init__(self, sim, round_idx: int):
        self.n, self.p = sim.layout.numel, sim.personal_numel
        self.c = sim.strategy.client_state_numel(sim.layout)
        self.s = sim.strategy.server_state_numel(sim.layout)
        self.m = sim.personalization.model_state_numel(sim.layout)
        self.k = sim.schedule.cohort_size(round_idx)
        self.width = self.p + self.c + self.m
        self.broadcast_size = self.n + self.s + self.k * self.width + 1
        self.reduce_size = self.n + 2 + self.s + self.k * self.width + self.k

    def broadcast_parts(self, buf: torch.Tensor):
        """(global state, server state, slots (K, P + C + M)) views of a broadcast buffer."""
        n, s = self.n, self.s
        return buf[:n], buf[n:n + s], buf[n + s:n + s + self.k * self.width].view(self.k, self.width)

    def reduce_parts(self, buf: torch.Tensor):
        """(delta sum, weight sum, loss sum, state change sum, slots) views of a reduce buffer."""
        n, s = self.n, self.s
        slots = buf[n + 2 + s:n + 2 + s + self.k * self.width].view(self.k, self.width)
        return buf[:n], buf[n], buf[n + 1], buf[n + 2:n + 2 + s], slots

    def dropped(self, buf: torch.Tensor) -> torch.Tensor:
        """(K,) view of a reduce buffer's dropped flags (1.0: that cohort client's update was not finite)."""
        return buf[self.reduce_size - self.k:]


def stopped(buf: torch.Tensor) -> bool:
    """Whether a received broadcast ends the run (its control value is STOP; one host read)."""
    return float(buf[-1]) == STOP


class RelativeWeights:
    """Client weights ``exp(log_weight)`` of a strategy whose weights matter only up to a common
    factor (``strategy.relative_weights``: DGA's softmax), kept as ``exp(log_weight - shift)`` with
    ``shift`` the largest log-weight seen so far: a log-sum-exp softmax, so no weight overflows, and
    none underflows unless it is below 1e-38 of the best client's.

    The running sums that hold weighted terms (``sums``: the delta sum, the weight sum, the loss
    sum) are rescaled whenever the shift rises, and :meth:`align` rescales them to the largest
    shift over all ranks before the reduce. A dropped client (``ok`` False) has weight 0.
    """

    def __init__(self, sums: list[torch.Tensor], device):
        self.sums = sums
        self.shift = torch.full((), -torch.inf, device=device)

    def _rescale(self, new_shift: torch.Tensor) -> None:
        factor = torch.where(torch.isneginf(new_shift), 1.0, torch.exp(self.shift - new_shift))
        torch._foreach_mul_(self.sums, factor)
        self.shift = new_shift

    def weights(self, log_weight: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Weights (shaped like ``log_weight``: 0-dim or (K,)) relative to the new shift."""
        log_weight = torch.where(ok, log_weight, -torch.inf)
        self._rescale(torch.maximum(self.shift, log_weight.max()))
        return torch.where(ok, torch.exp(log_weight - self.shift), 0.0)

    def align(self, transport, what: str) -> None:
        """Rescale the sums to the largest shift over all ranks (every rank calls this once)."""
        self._rescale(transport.all_reduce_max(self.shift.clone().view(1), what).view(()))  # reduced in place


def _relative(sim, lay, out) -> RelativeWeights | None:
    if not sim.strategy.relative_weights:
        return None
    delta_sum, weight_sum, loss_sum, _, _ = lay.reduce_parts(out)
    return RelativeWeights([delta_sum, weight_sum.view(1), loss_sum.view(1)], out.device)


def train_share(sim, round_idx: int, round_buf: torch.Tensor) -> torch.Tensor:
    """Train this rank's clients of the round's cohort; return its reduce buffer (see RoundLayout)."""
    lay = RoundLayout(sim, round_idx)
    cohort = sim.schedule.cohort(round_idx)
    sizes = sim.train_clients.sizes
    mine = balance(cohort, sizes[cohort], len(sim.ctx.workers))[sim.ctx.workers.index(sim.ctx.rank)]
    global_flat, _, slots = lay.broadcast_parts(round_buf)
    out = torch.zeros(lay.reduce_size, device=sim.ctx.device)
    slot_of = {int(c): i for i, c in enumerate(cohort)}
    relative = _relative(sim, lay, out)
    if sim.vectorized is not None:
        _train_vectorized(sim, round_idx, mine, [slot_of[int(c)] for c in mine], global_flat, slots, out, lay,
                          relative)
    else:
        _train_sequential(sim, round_idx, mine, slot_of, round_buf, out, lay, relative)
    if relative is not None:
        relative.align(sim.transport, f"round {round_idx} weight shift")
    return out


def _train_sequential(sim, round_idx, mine, slot_of, round_buf, out, lay, relative) -> None:
    """The client loop: each client of ``mine`` trained in turn, its terms added to ``out``."""
    p, k = lay.p, sim.layout.num_params
    sizes = sim.train_clients.sizes
    global_flat, server_state, slots = lay.broadcast_parts(round_buf)
    delta_sum, _, _, state_change, out_slots = lay.reduce_parts(out)
    lr = sim.cfg.client_config.optimizer_config.lr
    weights, losses, finite = [], [], []
    dropped = lay.dropped(out)
    for cid in mine:
        slot = slot_of[int(cid)]
        client_state = slots[slot, p:p + lay.c] if lay.c else None
        correction = sim.strategy.gradient_correction(server_state, client_state) if lay.c else None
        hook = sim.personalization.client_hook(sim.trainer, round_idx, int(cid), sim.train_clients.get(cid),
                                               global_flat, slots[slot, p + lay.c:]) if lay.m else None
        loss = sim.trainer.train(round_idx, int(cid), sim.train_clients.get(cid), global_flat,
                                 slots[slot, :p] if p else None, correction=correction,
                                 step_hook=getattr(hook, "step", None))
        model = hook.result() if lay.m else None
        ok = sim.layout.keep_if_finite_(loss, *([model] if lay.m else []))  # not finite: state zeroed
        dropped[slot] = (~ok).to(dropped.dtype)
        if relative is None:
            weight = sim.strategy.client_weight(int(sizes[cid]), loss)
        else:  # weighted terms go straight into the sums that the shift rescales
            weight = relative.weights(sim.strategy.log_weight(loss), ok)
            out[lay.n] += weight
            out[lay.n + 1] += weight * torch.where(ok, loss, 0.0)
        sim.layout.accumulate_delta_(delta_sum, torch.where(ok, weight, 0.0), global_flat)  # dropped: adds nothing
        weights.append(weight)
        losses.append(loss)
        finite.append(ok)
        if p or lay.c:
            state = sim.layout.flatten()
            out_slots[slot, :p] = state[sim.personal_index]
        if lay.c:
            new = sim.strategy.new_client_state(server_state, client_state, global_flat[:k], state[:k],
                                                sim.trainer.shared_steps, lr)
            new[sim.personal_params] = 0.0  # controls of the shared parameters only: personal ones are never averaged
            out_slots[slot, p:p + lay.c] = new
            state_change.add_((new - client_state) * ok)
        if lay.m:
            out_slots[slot, p + lay.c:] = model
    if mine.size and relative is None:
        out[lay.n], out[lay.n + 1] = _weighted_sums(weights, losses, finite, out.device)


def _weighted_sums(weights: list, losses: list[torch.Tensor], finite: list[torch.Tensor],
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the clients' weights, weighted sum of their mean losses) in a few kernels for the whole
    share, not a few per client. ``weights`` are host floats or 0-dim device tensors (DGA); a client
    whose ``finite`` flag is False counts with weight 0 (its NaN loss too)."""
    w = torch.stack(weights) if torch.is_tensor(weights[0]) else host_to_device(weights, device, torch.float32)
    ok = torch.stack(finite).to(w.device)
    w = torch.where(ok, w, 0.0)
    return w.sum(), torch.dot(w, torch.where(ok, torch.stack(losses).to(w.dtype), 0.0))


def _train_vectorized(sim, round_idx, mine, mine_slots, global_flat, slots, out, lay, relative) -> None:
    """Vectorized variant of the client loop: groups of ``vectorize_chunk`` clients at once."""
    n, p, k = sim.layout.numel, sim.personal_numel, sim.layout.num_params
    chunk = sim.cfg.client_config.vectorize_chunk
    delta_sum, _, _, _, out_slots = lay.reduce_parts(out)
    for start in range(0, len(mine), chunk):
        ids = mine[start:start + chunk]
        personal = rows = None
        if p:  # personal layers: the group's slot rows (a list index would copy blocking)
            rows = host_to_device(mine_slots[start:start + chunk], out.device)
            personal = slots[rows]
        stack, losses = sim.vectorized.train_group(round_idx, ids, [sim.train_clients.get(c) for c in ids],
                                                   global_flat, personal, sim.personal_index)
        ok = keep_rows_if_finite_(stack, losses)  # rows not finite: zeroed, and weighted 0 below
        lay.dropped(out)[host_to_device(mine_slots[start:start + chunk], out.device)] = (~ok).to(out.dtype)
        losses = torch.where(ok, losses, 0.0)
        if relative is None:
            weights = torch.where(ok, sim.strategy.client_weight(sim.train_clients.sizes[ids], losses), 0.0)
        else:
            weights = relative.weights(sim.strategy.log_weight(losses), ok)
        delta_sum[:k] += weights @ (stack - global_flat[:k])  # deltas first: see StateLayout.accumulate_delta_
        out[n] += weights.sum()
        out[n + 1] += (weights * losses).sum()
        if p:
            full = torch.cat([stack, global_flat[k:].expand(len(ids), -1)], dim=1)
            out_slots[rows] = full[:, sim.personal_index]


def eval_buffer_size(sim, num_trained: int) -> int:
    """Floats of an evaluation round's broadcast: the global state, ``num_trained`` stored entries
    and the control value."""
    return sim.layout.numel + num_trained * eval_width(sim) + 1


def run_worker(sim) -> None:
    """Loop of a rank >= 1: receive the start round (-1: the server could not start; stop), then
    follow the schedule to the end, or until a broadcast says STOP (the server ended the run)."""
    start = int(sim.transport.broadcast(torch.zeros(1, device=sim.ctx.device), "start broadcast").item())
    if start < 0:
        return
    trained = sim.schedule.trained_through(start - 1)
    for r in range(start, sim.schedule.rounds + 1):
        buf = sim.transport.broadcast(torch.empty(RoundLayout(sim, r).broadcast_size, device=sim.ctx.device),
                                      f"round {r} broadcast")
        if stopped(buf):
            return
        sim.transport.reduce_sum(train_share(sim, r, buf), f"round {r} reduce")
        trained.update(sim.schedule.cohort(r).tolist())
        if sim.schedule.is_eval_round(r):
            ids = sorted(trained) if sim.personalization.evaluates_personalized else []
            ebuf = sim.transport.broadcast(torch.empty(eval_buffer_size(sim, len(ids)), device=sim.ctx.device),
                                           f"round {r} eval broadcast")
            if stopped(ebuf):
                return
            sim.transport.reduce_sum(eval_share(sim, r, ebuf[:-1], ids).view(-1), f"round {r} eval reduce")
