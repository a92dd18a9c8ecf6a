"""A worker rank: trains its share of each cohort and evaluates its share of clients."""
from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol

import numpy as np
import torch

from core.cohort import balance
from core.distributed import host_to_device
from core.evaluation import eval_messages, share_of_evaluation
from core.exact import FixedPointSums, decode, state_change_bits
from core.flat import keep_rows_if_finite_
from core.messages import STOP, Message, Value, round_broadcast, round_reduce, start_broadcast
from core.local_run import RunInputs
from core.privacy import CENTRAL, clip_factor


class RoundLayout:
    """One round's two messages (:mod:`core.messages`), declared from the run and the round.

    Broadcast (:func:`core.messages.round_broadcast`, float32): global state (N) | server strategy
    state (S) | K cohort slots of width P + C + M | control (1: GO, or STOP when the server ends the
    run early). A slot holds a client's personal layers (P), its strategy state (C) and its separate
    personal model (M, Ditto).

    Reduce (:func:`core.messages.round_reduce`), for a strategy with ``exact_sum`` (weights known
    before training: FedAvg, FedProx, SCAFFOLD), int64: the fixed-point delta sum (N) | the
    fixed-point strategy-state change sum (S) | float32 pairs, two per int64: K clients' mean
    training losses | K slots | K dropped flags (| one float of padding when their count is odd).
    Integer sums do not depend on the order of addition, so any split of the cohort over ranks gives
    the same bits (:mod:`core.exact`); the float32 parts are each written by one rank only (the
    others leave zero bits), so the int64 sum carries them bit for bit.

    Under DP (``privacy.mechanism`` not none, ``dp``), the reduce is the exact-sum one with a
    ``clipped`` flag per cohort client, and each client's delta is clipped by ``factor_i = min(1, C /
    ||delta_i||)`` (C the round's clip norm, :meth:`clip_norm`; the norm over the shared parameters;
    the delta's personal and buffer entries are zeroed first). Central (``central``): the client's
    share is ``p_i = factor_i / E``, ``E`` the expected cohort (a fixed denominator, not the kept
    clients' weight), so :meth:`reduce_parts` returns the sum of the clipped deltas; the cohort may
    be empty (K = 0): every per-client part is then empty. Local: the share is ``factor_i`` times
    the usual one; the clients' noise is added on the server, as one sum
    (:meth:`core.privacy.LocalDp.noise`).

    Reduce, otherwise (DGA), float32: weighted delta sum (N) | weight sum | weighted loss sum |
    summed change of the client strategy states (S) | K slots | K dropped flags.

    The rank that trains a client fills its slot, and sets its dropped flag to 1 when the client's
    update was not finite or (fixed point) out of range: it is then left out of every sum, and its
    slot is not stored. Read a reduce buffer with :meth:`reduce_parts` and :meth:`dropped`; every
    accessor raises :class:`core.messages.MessageMismatch` for a buffer of another declaration.
    """

    def __init__(self, sim, round_idx: int):
        self.n = sim.layout.numel
        self.row = sim.rows  # a slot's layout: personal layers, named strategy state, named model state
        self.p, self.c, self.m, self.width = self.row.p, self.row.c, self.row.m, self.row.width
        self.server_parts = sim.strategy.server_state(sim.layout)
        self.s = self.server_parts.numel
        self.cohort = sim.schedule.cohort(round_idx)  # (K,) sorted client ids, the same on every rank
        self.k = len(self.cohort)
        self.exact = bool(sim.strategy.exact_sum) and not sim.strategy.relative_weights
        privacy = sim.cfg.privacy
        self.dp = privacy.mechanism != "none"  # the config refuses every strategy without exact_sum
        self.central = privacy.mechanism in CENTRAL
        self.adaptive = privacy.mechanism == "adaptive_gaussian"  # the clip norm travels in the broadcast
        self.fixed_clip_norm = privacy.clip_norm
        self.broadcast = round_broadcast(self.n, self.s, self.k, self.width, self.adaptive)
        self.reduce = round_reduce(self.n, self.s, self.k, self.width, self.exact, self.dp)
        self.broadcast_size = self.broadcast.numel
        if self.exact:
            self.weights = sim.strategy.cohort_weights(sim.train_clients.sizes[self.cohort])  # (K,) float64
            self.weight_total = math.fsum(self.weights)
            self.shares = self.weights / self.weight_total  # p_i, the same on every rank
        if self.central:  # a fixed denominator: the expected cohort E (before each client's clip factor)
            self.weight_total = float(sim.cfg.server_config.num_clients_per_iteration)
            self.shares = np.full(self.k, 1.0 / self.weight_total)

    def broadcast_parts(self, buf: torch.Tensor):
        """(global state (N,), server state (S,), slots (K, P + C + M)) float32 views of a broadcast
        buffer."""
        parts = self.broadcast.views(buf)
        return parts["global"], parts["server_state"], parts["slots"]

    def clip_norm(self, buf: torch.Tensor) -> float:
        """The round's clip norm under DP: the configured one, or the one a broadcast ``buf`` carries
        (adaptive clipping; one host read)."""
        return float(self.broadcast.view(buf, "clip_norm")) if self.adaptive else self.fixed_clip_norm

    def new_reduce_buffer(self, device) -> torch.Tensor:
        """A zeroed reduce buffer (int64 for an exact sum, float32 otherwise)."""
        return self.reduce.zeros(device)

    def exact_parts(self, buf: torch.Tensor):
        """(delta sum (N) int64, state change sum (S) int64, losses (K) float32) writable views of an
        exact-sum reduce buffer (the slots and dropped flags: :meth:`slots`, :meth:`dropped`)."""
        parts = self.reduce.views(buf)
        return parts["delta"], parts["state_change"], parts["losses"]

    def reduce_parts(self, buf: torch.Tensor):
        """(delta sum (N), weight sum, loss sum, state change sum (S), slots (K, P + C + M)) of a
        reduce buffer.

        Float32 layout: views. Exact-sum layout: decoded values, read once on the host (the
        server's, at the end of a round): the delta sum ``sum_kept w_i * delta_i`` as float64 on the
        buffer's device (the fixed-point sum times the cohort's total weight; under DP the sum of the
        clipped deltas ``sum_kept factor_i * delta_i``: the fixed-point sum times E), the weight sum
        ``sum_kept w_i`` and the loss sum ``sum_kept w_i * loss_i`` as host floats (``math.fsum`` in
        cohort order: correctly rounded, so the reported training loss does not depend on the split
        either), the state change sum as float32; the slots a float32 view.
        """
        parts = self.reduce.views(buf)
        if not self.exact:
            return parts["delta"], parts["weight"], parts["loss"], parts["state_change"], parts["slots"]
        losses, dropped = parts["losses"].tolist(), parts["dropped"].tolist()
        kept = [(w, l) for w, l, d in zip(self.weights.tolist(), losses, dropped) if d == 0]
        weight_sum = math.fsum(w for w, _ in kept)
        loss_sum = math.fsum(w * l for w, l in kept)
        delta_sum = decode(parts["delta"]) * self.weight_total
        state = decode(parts["state_change"], state_change_bits(self.k)).float()
        return delta_sum, weight_sum, loss_sum, state, parts["slots"]

    def slots(self, buf: torch.Tensor) -> torch.Tensor:
        """(K, P + C + M) float32 view of a reduce buffer's slots."""
        return self.reduce.view(buf, "slots")

    def clipped(self, buf: torch.Tensor) -> torch.Tensor:
        """(K,) float32 view of a DP reduce buffer's clipped flags (1.0: that cohort client's update
        was summed and had been clipped). Raises MessageMismatch without DP."""
        return self.reduce.view(buf, "clipped")

    def dropped(self, buf: torch.Tensor) -> torch.Tensor:
        """(K,) float32 view of a reduce buffer's dropped flags (1.0: that cohort client was dropped:
        its update was not finite, or out of the fixed-point range)."""
        return self.reduce.view(buf, "dropped")


def stopped(message: Message, buf: torch.Tensor) -> bool:
    """Whether a received broadcast ``buf`` of ``message`` ends the run (its ``control`` part is
    STOP; one host read). Raises MessageMismatch when ``buf`` does not match ``message``."""
    return float(message.view(buf, "control")) == STOP


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
    if lay.exact or not sim.strategy.relative_weights:
        return None
    parts = lay.reduce.views(out)
    return RelativeWeights([parts["delta"], parts["weight"].view(1), parts["loss"].view(1)], out.device)


def train_share(sim, round_idx: int, round_buf: torch.Tensor, lay: RoundLayout | None = None) -> torch.Tensor:
    """Train this rank's clients of the round's cohort from ``round_buf`` (a round broadcast);
    return its reduce buffer (``lay``: the round's :class:`RoundLayout`, built when None).

    Raises:
        MessageMismatch: ``round_buf`` is not a buffer of the round's broadcast.
    """
    lay = RoundLayout(sim, round_idx) if lay is None else lay
    cohort = lay.cohort
    sizes = sim.train_clients.sizes
    mine = balance(cohort, sizes[cohort], len(sim.ctx.workers))[sim.ctx.workers.index(sim.ctx.rank)]
    global_flat, _, slots = lay.broadcast_parts(round_buf)
    out = lay.new_reduce_buffer(sim.ctx.device)
    slot_of = {int(c): i for i, c in enumerate(cohort)}
    relative = _relative(sim, lay, out)
    fixed = None
    if lay.exact:
        delta_fixed, state_fixed, _ = lay.exact_parts(out)
        fixed = FixedPointSums(delta_fixed, state_fixed, lay.k)
    clip = ClientClip(sim, lay.clip_norm(round_buf)) if lay.dp else None
    if sim.vectorized is not None:
        _train_vectorized(sim, round_idx, mine, [slot_of[int(c)] for c in mine], global_flat, slots, out, lay,
                          relative, fixed, clip)
    else:
        _train_sequential(sim, round_idx, mine, slot_of, round_buf, out, lay, relative, fixed, clip)
    if relative is not None:
        relative.align(sim.transport, f"round {round_idx} weight shift")
    return out


def _train_sequential(sim, round_idx, mine, slot_of, round_buf, out, lay, relative, fixed, clip) -> None:
    """The client loop: each client of ``mine`` trained in turn, its terms added to ``out`` (to the
    fixed-point sums of ``fixed`` when the layout is exact)."""
    p, k = lay.p, sim.layout.num_params
    sizes = sim.train_clients.sizes
    global_flat, server_state, slots = lay.broadcast_parts(round_buf)
    parts = lay.reduce.views(out)
    out_slots, dropped = parts["slots"], parts["dropped"]
    delta_sum, state_change = parts["delta"], parts["state_change"]
    lr = sim.cfg.client_config.optimizer_config.lr
    server = lay.server_parts.views(server_state)
    weights, losses, finite = [], [], []
    for cid in mine:
        slot = slot_of[int(cid)]
        inputs = RunInputs(sim.layout, global_flat, server, lay.row.strategy_state(slots[slot]),
                           sim.trainer.shared_positions, sim.personal_params)
        run = sim.strategy.shape_run(sim.trainer.default_run, inputs)
        hook = sim.personalization.client_hook(sim.trainer, round_idx, int(cid), sim.train_clients.get(cid),
                                               global_flat, lay.row.model_state(slots[slot])) if lay.m else None
        loss = sim.trainer.train(round_idx, int(cid), sim.train_clients.get(cid), global_flat,
                                 slots[slot, :p] if p else None, hook.shape(run) if hook is not None else run)
        model = hook.result() if hook is not None else None
        ok = sim.layout.keep_if_finite_(loss, *([model] if lay.m else []))  # not finite: state zeroed
        state: torch.Tensor | None = None
        change: torch.Tensor | None = None
        if p or lay.c:
            state = sim.layout.flatten()
            out_slots[slot, :p] = state[sim.personal_index]
            if lay.c:
                new = lay.row.strategy_parts.flat(sim.strategy.new_client_state(inputs, state[:k],
                                                                                sim.trainer.shared_steps, lr))
                out_slots[slot, p:p + lay.c] = new
                change = new - slots[slot, p:p + lay.c]
        if lay.m:
            out_slots[slot, p + lay.c:] = model
        if lay.exact:
            sim.layout.delta_(fixed.delta, global_flat, state)
            share, clipped = float(lay.shares[slot]), False
            if clip is not None:
                share, clipped = clip.one(fixed.delta, share)
            ok = fixed.add_(ok, share, change)  # out of range: dropped too
            parts["losses"][slot] = loss
            if lay.dp:
                parts["clipped"][slot] = ok.float() * clipped
        else:
            if relative is None:
                weight = sim.strategy.client_weight(int(sizes[cid]), loss)
            else:  # weighted terms go straight into the sums that the shift rescales
                weight = relative.weights(sim.strategy.log_weight(loss), ok)
                parts["weight"] += weight
                parts["loss"] += weight * torch.where(ok, loss, 0.0)
            sim.layout.accumulate_delta_(delta_sum, torch.where(ok, weight, 0.0), global_flat)  # dropped: adds nothing
            weights.append(weight)
            losses.append(loss)
            finite.append(ok)
            if lay.c:
                state_change.add_(change * ok)
        dropped[slot] = (~ok).to(dropped.dtype)
    if mine.size and relative is None and not lay.exact:
        weight_sum, loss_sum = _weighted_sums(weights, losses, finite, out.device)
        parts["weight"].copy_(weight_sum)
        parts["loss"].copy_(loss_sum)


class ClientClip:
    """DP's clipping of each client's delta on its worker, in one round (DP-FedAvg, McMahan et al.
    2018, arXiv:1710.06963): the personal and buffer entries zeroed, the L2 norm of the shared ones
    taken in float64, and the clip factor ``min(1, C / ||delta||)`` folded into the client's share,
    so the fixed-point sum holds the clipped delta. The noise, central or local, is the server's."""

    def __init__(self, sim, clip_norm: float):
        self.sim, self.clip_norm = sim, clip_norm

    def one(self, delta: torch.Tensor, share: float) -> tuple[float, bool]:
        """Clip one client's (N,) float32 ``delta`` (its personal and buffer entries zeroed in place);
        returns (its share times the clip factor, whether it was clipped). One host read."""
        sim = self.sim
        delta[sim.personal_index] = 0.0
        delta[sim.layout.num_params:] = 0.0
        norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
        factor = clip_factor(norm, self.clip_norm)
        return share * factor, factor < 1.0

    def rows(self, deltas: torch.Tensor, shares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`one` for a vectorized group: (C, num_params) float32 ``deltas`` (personal entries
        zeroed in place), (C,) float64 ``shares``; returns the (C,) shares times their clip factors
        and the (C,) bool clipped flags, without a host sync."""
        deltas[:, self.sim.personal_params] = 0.0
        norms = torch.linalg.vector_norm(deltas, dim=1, dtype=torch.float64)
        factors = torch.where(norms > self.clip_norm, self.clip_norm / norms, 1.0)
        return shares * factors, norms > self.clip_norm


def _weighted_sums(weights: list, losses: list[torch.Tensor], finite: list[torch.Tensor],
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the clients' weights, weighted sum of their mean losses) in a few kernels for the whole
    share, not a few per client. ``weights`` are host floats or 0-dim device tensors (DGA); a client
    whose ``finite`` flag is False counts with weight 0 (its NaN loss too)."""
    w = torch.stack(weights) if torch.is_tensor(weights[0]) else host_to_device(weights, device, torch.float32)
    ok = torch.stack(finite).to(w.device)
    w = torch.where(ok, w, 0.0)
    return w.sum(), torch.dot(w, torch.where(ok, torch.stack(losses).to(w.dtype), 0.0))


def _train_vectorized(sim, round_idx, mine, mine_slots, global_flat, slots, out, lay, relative, fixed, clip) -> None:
    """Vectorized variant of the client loop: groups of ``vectorize_chunk`` clients at once."""
    p, k = sim.personal_numel, sim.layout.num_params
    chunk = sim.cfg.client_config.vectorize_chunk
    parts = lay.reduce.views(out)
    for start in range(0, len(mine), chunk):
        ids = mine[start:start + chunk]
        rows = host_to_device(mine_slots[start:start + chunk], out.device)  # a list index would copy blocking
        personal = slots[rows] if p else None  # personal layers: the group's slot rows
        stack, losses = sim.vectorized.train_group(round_idx, ids, [sim.train_clients.get(c) for c in ids],
                                                   global_flat, personal, sim.personal_index)
        ok = keep_rows_if_finite_(stack, losses)  # rows not finite: zeroed, and weighted 0 below
        if lay.exact:  # the same integers per client as the sequential loop's
            deltas = stack - global_flat[:k]
            shares = host_to_device(lay.shares[mine_slots[start:start + chunk]], out.device, torch.float64)
            clipped = None
            if clip is not None:
                shares, clipped = clip.rows(deltas, shares)
            ok = fixed.add_rows_(deltas, ok, shares)  # out of range: dropped too
            parts["losses"][rows] = losses
            if clipped is not None:
                parts["clipped"][rows] = (ok & clipped).float()
        else:
            losses = torch.where(ok, losses, 0.0)
            if relative is None:
                weights = torch.where(ok, sim.strategy.client_weight(sim.train_clients.sizes[ids], losses), 0.0)
            else:
                weights = relative.weights(sim.strategy.log_weight(losses), ok)
            parts["delta"][:k] += weights @ (stack - global_flat[:k])  # deltas first: see StateLayout.accumulate_delta_
            parts["weight"] += weights.sum()
            parts["loss"] += (weights * losses).sum()
        parts["dropped"][rows] = (~ok).to(torch.float32)
        if p:
            full = torch.cat([stack, global_flat[k:].expand(len(ids), -1)], dim=1)
            parts["slots"][rows] = full[:, sim.personal_index]


class Leader(Protocol):
    """Rank 0's part of the round program (:func:`run_rounds`): it fills each broadcast's payload
    and applies each reduced result; every other step is the same on every rank. Implemented by
    :class:`core.server.Server`."""

    def fill_round(self, round_idx: int, lay: RoundLayout) -> Mapping[str, Value]:
        """The round's broadcast payload: a value per part of ``lay.broadcast``."""

    def apply_round(self, round_idx: int, lay: RoundLayout, total: torch.Tensor) -> None:
        """Apply the round's reduced ``total`` (a buffer of ``lay.reduce``)."""

    def fill_eval(self, round_idx: int, trained: list[int]) -> Mapping[str, Value]:
        """The evaluation's broadcast payload (parts of :func:`core.evaluation.eval_messages`)."""

    def apply_eval(self, round_idx: int, trained: list[int], matrix: torch.Tensor) -> None:
        """Apply the evaluation's reduced (num_clients, COLUMNS) ``matrix``."""

    def end_round(self, round_idx: int) -> None:
        """The round, and its evaluation if it had one, are applied (checkpoints)."""


def exchange(sim, sent: Message, summed: Message, payload: Mapping[str, Value] | None,
             share: Callable[[torch.Tensor], torch.Tensor], what: str) -> torch.Tensor | None:
    """One broadcast of ``sent`` and one sum-reduce of ``summed``, the same on every rank.

    Rank 0 builds the broadcast from ``payload``; other ranks pass None and receive into an empty
    buffer of the same declaration. Every rank then computes ``share(received buffer)``, a flat
    buffer of ``summed``, which is reduced to rank 0. Collectives are named ``{what} broadcast``
    and ``{what} reduce``.

    Returns:
        The reduced buffer (its sum is valid on rank 0), or None when the broadcast said STOP.
    Raises:
        MessageMismatch: the payload or a buffer does not match its declaration (before the
            collective that would carry it).
    """
    device = sim.ctx.device
    buf = sent.build(device, payload) if payload is not None else sent.empty(device)
    buf = sim.transport.broadcast(buf, f"{what} broadcast")
    if stopped(sent, buf):
        return None
    return sim.transport.reduce_sum(summed.check(share(buf)), f"{what} reduce")


def play_round(sim, round_idx: int, leader: Leader | None = None) -> tuple[RoundLayout, torch.Tensor | None]:
    """Round ``round_idx``'s broadcast, this rank's training share and the reduce (see
    :func:`exchange`; ``leader`` on rank 0 fills the payload). Returns the round's layout and the
    reduced buffer (None: the server said STOP)."""
    lay = RoundLayout(sim, round_idx)
    payload = leader.fill_round(round_idx, lay) if leader is not None else None
    total = exchange(sim, lay.broadcast, lay.reduce, payload, lambda buf: train_share(sim, round_idx, buf, lay),
                     f"round {round_idx}")
    return lay, total


def play_evaluation(sim, round_idx: int, trained: list[int], leader: Leader | None = None) -> torch.Tensor | None:
    """An evaluation's broadcast, this rank's share of it and the reduce (see :func:`exchange`):
    the reduced (num_clients, COLUMNS) matrix (valid on rank 0), or None when the server said STOP.
    ``trained``: the clients whose stored vectors the broadcast carries, in order."""
    sent, summed = eval_messages(sim, len(trained))

    def share(buf: torch.Tensor) -> torch.Tensor:
        parts = sent.views(buf)
        return share_of_evaluation(sim, round_idx, parts["global"], parts["personal"], trained).view(-1)

    payload = leader.fill_eval(round_idx, trained) if leader is not None else None
    total = exchange(sim, sent, summed, payload, share, f"round {round_idx} eval")
    return None if total is None else summed.view(total, "matrix")


def exchange_start(sim, start_round: int | None = None) -> int:
    """The start broadcast: rank 0 sends ``start_round`` (-1: it could not start), the others
    receive it (pass None). Returns the start round on every rank."""
    msg = start_broadcast()
    payload = msg.build(sim.ctx.device, {"start_round": float(start_round)}) if start_round is not None else None
    buf = sim.transport.broadcast(payload if payload is not None else msg.empty(sim.ctx.device), "start broadcast")
    return int(msg.view(buf, "start_round").item())


def run_rounds(sim, start: int, leader: Leader | None = None) -> None:
    """The round program of every rank: rounds ``start..rounds``, each a broadcast, this rank's
    training share and a reduce, then on an evaluation round the same for the evaluation of every
    client. Rank 0 passes its ``leader``, which fills the broadcasts and applies the reduced
    results; the other ranks pass None and stop when a broadcast says STOP.

    Raises:
        RunStopped: from the leader (rank 0), which then releases the other ranks itself.
    """
    trained = sim.schedule.trained_through(start - 1)
    for r in range(start, sim.schedule.rounds + 1):
        lay, total = play_round(sim, r, leader)
        if total is None:
            return
        trained.update(lay.cohort.tolist())
        if leader is not None:
            leader.apply_round(r, lay, total)
        if sim.schedule.is_eval_round(r):
            ids = sorted(trained) if sim.personalization.evaluates_personalized else []
            matrix = play_evaluation(sim, r, ids, leader)
            if matrix is None:
                return
            if leader is not None:
                leader.apply_eval(r, ids, matrix)
        if leader is not None:
            leader.end_round(r)


def run_worker(sim) -> None:
    """Loop of a rank >= 1: receive the start round (-1: the server could not start; stop), then
    run the round program (:func:`run_rounds`) to the end, or until a broadcast says STOP (the
    server ended the run)."""
    start = exchange_start(sim)
    if start >= 0:
        run_rounds(sim, start)
