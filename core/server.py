"""The server (rank 0): samples cohorts, aggregates, evaluates, writes results and checkpoints."""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.client_store import ClientStore
from core.evaluation import (best_metric, eval_messages, eval_width, evaluation_record, global_for_evaluation,
                             improves, metric_value)
from core.optim import build_server_optimizer
from core.errors import RunStopped, UserError
from core.privacy import AdaptiveClip, CentralDp, LocalDp, Mechanism, delta_caveat, mechanism_of
from core.exact import RANGE
from core.messages import GO, STOP
from core.worker import RoundLayout, exchange_start, play_evaluation, play_round, run_rounds
from core.checkpoint import load_checkpoint, save_atomic
from core.files import disk_guard, saved_size
from core.observers import RunObserver, RunOutcome


class Diverged(RunStopped):
    """The run stopped because training diverged: every client of a round sent a non-finite update,
    or the global model or server state became non-finite. Exit status 1."""

    exit_code = 1


class Server:
    """Holds the global state (N,) flat vector, the server optimizer and the client store.

    The server optimizer steps the parameter part of the global vector with the pseudo-gradient
    (FLUTE's pseudo-gradient-as-``.grad``); buffers (BatchNorm statistics) take the plain weighted
    mean. Positions of personal layers are never changed by aggregation (nor by the server
    optimizer's weight decay).
    """

    def __init__(self, sim, run_dir: Path, resume: Path | None, observers: Sequence[RunObserver] = ()):
        self.sim = sim
        self.run_dir = run_dir
        self.global_flat = sim.layout.flatten().clone()
        self.weights = torch.nn.Parameter(self.global_flat[:sim.layout.num_params])
        self.optimizer = build_server_optimizer([self.weights], sim.cfg.server_config.optimizer_config)
        self.store = ClientStore(run_dir / "client_store.f32", sim.cfg.server_config.client_store_memory_mb * 2**20)
        self.server_parts = sim.strategy.server_state(sim.layout)  # the strategy's named server state
        self.strategy_state = torch.zeros(self.server_parts.numel, device=sim.ctx.device)
        self.history: list[dict] = []
        self._pending_dropped: list[int] = []  # dropped counts of the rounds after the last evaluation
        # central DP: per round since the last evaluation, [clients clipped, client updates summed]
        self.clip_counts: list[list[int]] = []
        self.start_round = 1
        self.elapsed_before = 0.0
        self.observers = list(observers)  # what the run writes besides checkpoints (core/observers.py)
        restored = load_checkpoint(resume) if resume is not None else None
        if restored is not None:
            self._restore(restored)
        self.dp = self._privacy(restored)
        # the clip norm of the next round (adaptive clipping moves it) and of the last one done
        self.clip_norm, self.last_clip_norm = self._restored_clip_norms(restored)
        self.trained = sim.schedule.trained_through(self.start_round - 1)  # clients sampled so far
        self.round = self.start_round - 1  # the round in progress (the last one done between rounds)
        self.saved_round = self.start_round - 1 if resume is not None else 0  # round of checkpoints/latest.pt
        self.evaluated = self.start_round - 1  # the last round whose evaluation ran
        # per round since the last evaluation; the dropped counts travel in checkpoints (a resume
        # reports them as the uninterrupted run would), the seconds restart at a resume
        self.since_eval: dict[str, list[float]] = {"round_s": [], "dropped_clients": list(self._pending_dropped)}
        # rank 0's part of the round program (core.worker.run_rounds), from a round's fill to its apply
        self._t0 = time.perf_counter()  # perf_counter() at round 1 of the run (run() sets it)
        self._round_started = self._t0
        self._sent: list[torch.Tensor] = []  # the cohort's slots as broadcast
        self._loss = float("nan")  # the last round's training loss
        self._evaluated_global: tuple[torch.Tensor, str] = (self.global_flat, "")  # see _global_for_evaluation

    # ---- checkpoint -------------------------------------------------------------------------
    def _state(self, round_idx: int, elapsed: float) -> dict:
        evaluated, formed = self._global_for_evaluation()
        return {"round": round_idx, "global": self.global_flat.cpu(), "server_optimizer": self.optimizer.state_dict(),
                "evaluated_personal": evaluated[self.sim.personal_index].cpu(), "global_model": formed,
                "client_store": self.store.state_dict(), "strategy_state": self.strategy_state.cpu(),
                "history": self.history, "elapsed_s": elapsed,
                "dropped_since_eval": list(self.since_eval["dropped_clients"]),
                **({"privacy": {"noise_multiplier": self.dp.noise_multiplier,
                                "rounds": self.sim.cfg.server_config.max_iteration,
                                "clip_norm": self.clip_norm, "last_clip_norm": self.last_clip_norm,
                                "clipped_since_eval": [list(c) for c in self.clip_counts]}} if self.dp else {}),
                "config": self.sim.cfg.to_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}

    def _restore(self, state: dict) -> None:
        with torch.no_grad():
            self.global_flat.copy_(state["global"])
        self.optimizer.load_state_dict(state["server_optimizer"])
        self.store.load_state_dict(state["client_store"])
        self.strategy_state = state["strategy_state"].to(self.sim.ctx.device)
        self.history = list(state["history"])
        self._pending_dropped = list(state.get("dropped_since_eval", []))
        self.clip_counts = [list(c) for c in state.get("privacy", {}).get("clipped_since_eval", [])]
        self.start_round = state["round"] + 1
        self.elapsed_before = state.get("elapsed_s", 0.0)
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def _privacy(self, restored: dict | None) -> Mechanism | None:
        """The run's DP mechanism (None without DP): a resumed run keeps the noise multiplier it
        started with (calibrated once, before round 1, for ``server_config.max_iteration`` rounds).
        A delta not below 1 / population is said on stderr (:func:`core.privacy.delta_caveat`).

        Raises:
            UserError: the model has buffers outside the personal layers (they would be averaged
                without clipping or noise); a resume under ``target_epsilon`` to another number of
                rounds than the noise was calibrated for; no noise reaches the target epsilon.
        """
        sim = self.sim
        if sim.cfg.privacy.mechanism == "none":
            return None
        k = sim.layout.num_params
        shared_buffers = sim.layout.numel - k - int((sim.personal_index >= k).sum())
        if shared_buffers:
            names = [name for name, _ in sim.model.named_buffers()]
            raise UserError(f"privacy.mechanism {sim.cfg.privacy.mechanism}: {sim.cfg.model.model_type} has buffers ({', '.join(names[:3])}"
                            f"{', ...' if len(names) > 3 else ''}) that would be averaged without clipping or noise; "
                            f"use a model without buffers (e.g. GroupNorm for BatchNorm), or keep them on the "
                            f"clients (personalization.method: fedbn)")
        caveat = delta_caveat(sim.cfg)
        if caveat and sim.ctx.rank == 0:
            sys.stderr.write(f"pfedsim: warning: {caveat}\n")
        saved = (restored or {}).get("privacy")
        if saved is None:
            return mechanism_of(sim.cfg, sim.schedule)  # calibrated here, on rank 0 only
        rounds = sim.cfg.server_config.max_iteration
        if sim.cfg.privacy.target_epsilon is not None and saved["rounds"] != rounds:
            raise UserError(f"privacy.target_epsilon: this run calibrated its noise multiplier "
                            f"({saved['noise_multiplier']:.6g}) for {saved['rounds']} rounds; resuming it to {rounds} "
                            f"would spend another epsilon; keep server_config.max_iteration: {saved['rounds']}")
        return mechanism_of(sim.cfg, sim.schedule, saved["noise_multiplier"])

    def _restored_clip_norms(self, restored: dict | None) -> tuple[float, float]:
        """The clip norms of the next round and of the last one done: the configured one, or a
        resumed run's (adaptive clipping moves them); 0.0 without DP."""
        if self.dp is None:
            return 0.0, 0.0
        saved = (restored or {}).get("privacy", {})
        first = self.dp.clip_norm
        if self._adaptive is not None:  # it travels as float32 (core.messages.round_broadcast)
            first = float(np.float32(first))
        return float(saved.get("clip_norm", first)), float(saved.get("last_clip_norm", first))

    def _checkpoint(self, round_idx: int, elapsed: float, name: str) -> None:
        """Write checkpoints/<name>.pt atomically.

        Raises:
            DiskFull: no space for it (the previous file of that name is kept, no partial file left).
        """
        state, path = self._state(round_idx, elapsed), self.run_dir / "checkpoints" / f"{name}.pt"
        with disk_guard(path, lambda: saved_size(state), path.with_name(path.name + ".tmp")):
            save_atomic(state, path)

    # ---- one round: rank 0's part of the round program (core.worker.run_rounds) ------------------
    def _round(self, round_idx: int) -> tuple[float, int]:
        """Run one round; returns (the weighted mean training loss of the clients kept, the number
        of clients dropped because their update was not finite).

        Raises:
            Diverged: see :meth:`_aggregate`.
        """
        lay, total = play_round(self.sim, round_idx, self)
        assert total is not None  # rank 0 sent GO
        return self._aggregate(round_idx, lay, total)

    def fill_round(self, round_idx: int, lay: RoundLayout) -> dict:
        """The round's broadcast payload (:func:`core.messages.round_broadcast`): the global state,
        the server state, and per cohort client its stored slot (or the default a new client starts
        from), kept until :meth:`_aggregate` for the clients that are dropped."""
        sim = self.sim
        self.round, self._round_started = round_idx, time.perf_counter()
        cohort = lay.cohort
        self.trained.update(cohort.tolist())
        start_model = [sim.personalization.initial_model_state(self.global_flat.cpu(), sim.layout)] if lay.m else []
        default = torch.cat([self.global_flat[sim.personal_index].cpu(), torch.zeros(lay.c)] + start_model)
        self._sent = [self.store.get(c, default) for c in cohort] if lay.width else []
        clip = {"clip_norm": self.clip_norm} if lay.adaptive else {}
        return {"global": self.global_flat, "server_state": self.strategy_state, "slots": self._sent, "control": GO,
                **clip}

    def apply_round(self, round_idx: int, lay: RoundLayout, total: torch.Tensor) -> None:
        """Aggregate the round (:meth:`_aggregate`), record its time and dropped count, tell the
        observers."""
        self._loss, dropped = self._aggregate(round_idx, lay, total)
        self.since_eval["round_s"].append(time.perf_counter() - self._round_started)
        self.since_eval["dropped_clients"].append(dropped)
        self._tell("round_done", round_idx, self._loss)

    def _aggregate(self, round_idx: int, lay: RoundLayout, total: torch.Tensor) -> tuple[float, int]:
        """Apply the round's reduced ``total``: store the returned slots, step the server state and
        the global model; returns (the weighted mean training loss of the clients kept, the number
        of clients dropped because their update was not finite).

        Raises:
            Diverged: every client of the round was dropped, or the new global model or server state
                is not finite (nothing is then written; the checkpoints keep the last finite state).
        """
        sim, cohort = self.sim, lay.cohort
        delta_sum, weight_sum, loss_sum, state_change, new_slots = lay.reduce_parts(total)
        dropped = lay.dropped(total).cpu() > 0
        if len(cohort) and bool(dropped.all()):  # an empty (Poisson) cohort is not divergence
            beyond = f" or beyond the exact sum's range (an entry of {RANGE:.0f} or more)" if lay.exact else ""
            raise Diverged(f"round {round_idx}: the updates of all {len(cohort)} clients of the round were not "
                           f"finite (NaN or inf){beyond}, so the global model cannot move{self._hint()}")
        if lay.width:  # a dropped client keeps what it was sent: its row, or the default it started from
            for cid, vec, sent, lost in zip(cohort, new_slots, self._sent, dropped.tolist()):
                self.store.put(int(cid), sent if lost else vec)
        if lay.s:
            parts = self.server_parts
            self.strategy_state = parts.flat(sim.strategy.new_server_state(
                parts.views(self.strategy_state), lay.row.strategy_parts.views(state_change), sim.schedule.num_clients))
        if self.dp is not None:
            self._count_clipped(round_idx, int(lay.clipped(total).sum()), int((~dropped).sum()))
        noise = self._noise(round_idx, lay, dropped)
        if noise is not None:
            delta_sum = delta_sum + noise.to(delta_sum.device)
        self._apply(delta_sum, lay.weight_total if isinstance(self.dp, CentralDp) else weight_sum)
        if not bool(torch.isfinite(self.global_flat).all() & torch.isfinite(self.strategy_state).all()):
            raise Diverged(f"round {round_idx}: the global model became non-finite (NaN or inf) after "
                           f"aggregation{self._hint()}")
        empty = isinstance(self.dp, CentralDp) and not weight_sum  # no client summed: no training loss
        return float("nan") if empty else float(loss_sum / weight_sum), int(dropped.sum())

    def _noise(self, round_idx: int, lay: RoundLayout, dropped: torch.Tensor) -> torch.Tensor | None:
        """The (N,) float64 CPU DP noise of round ``round_idx`` for the sum of clipped deltas (None
        without DP), zero at the personal and buffer positions, which never leave the clients:
        central, :meth:`core.privacy.CentralDp.noise` at the round's clip norm; local, the kept
        clients' own noises summed with their weights (:meth:`core.privacy.LocalDp.noise`;
        ``dropped``: the cohort's (K,) bool flags)."""
        sim = self.sim
        if isinstance(self.dp, CentralDp):
            noise = self.dp.noise(sim.cfg.seed, round_idx, sim.layout.numel, self.last_clip_norm)
        elif isinstance(self.dp, LocalDp):
            noise = self.dp.noise(sim.cfg.seed, round_idx, sim.layout.numel, lay.weights[~dropped.numpy()])
        else:
            return None
        noise[sim.layout.num_params:] = 0.0
        noise[sim.personal_index.cpu()] = 0.0
        return noise

    @property
    def _adaptive(self) -> AdaptiveClip | None:
        """The adaptive-clipping rule of the run's mechanism; None for a fixed clip norm or without DP."""
        return self.dp.adaptive if isinstance(self.dp, CentralDp) else None

    def _count_clipped(self, round_idx: int, clipped: int, summed: int) -> None:
        """Count the round's clipped and summed client updates; under adaptive clipping, step the
        clip norm of the next round with the noised share of unclipped ones."""
        self.clip_counts.append([clipped, summed])
        self.last_clip_norm = self.clip_norm
        adaptive = self._adaptive
        if adaptive is not None:
            assert isinstance(self.dp, CentralDp)
            self.clip_norm = adaptive.next_clip_norm(self.clip_norm, summed - clipped, summed, self.dp,
                                                     self.sim.cfg.seed, round_idx)

    def _hint(self) -> str:
        """The end of a divergence line: the learning rates to lower, and the last finite checkpoint."""
        cfg = self.sim.cfg
        kept = (f"checkpoints/latest.pt keeps round {self.saved_round}" if self.saved_round
                else "no checkpoint was written yet")
        return (f"; lower the learning rates (client_config.optimizer_config.lr "
                f"{cfg.client_config.optimizer_config.lr:g}, server_config.optimizer_config.lr "
                f"{cfg.server_config.optimizer_config.lr:g}); {kept}")

    def _apply(self, delta_sum: torch.Tensor, weight_sum) -> None:
        """Step the global model with the pseudo-gradient of the round's (N,) ``delta_sum`` and
        ``weight_sum`` (float32, or float64 from an exact sum: divided in float64, then rounded once
        to float32)."""
        sim = self.sim
        pseudo = sim.strategy.pseudo_gradient(delta_sum, weight_sum, self.server_parts.views(self.strategy_state))
        pseudo[sim.personal_index] = 0.0
        pseudo = pseudo.to(self.global_flat.dtype)
        k = sim.layout.num_params
        self.weights.grad = pseudo[:k].clone()
        personal = sim.personal_params
        kept = self.global_flat[personal]  # a copy: weight decay would move them despite the zero gradient
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.global_flat[personal] = kept
            self.global_flat[k:] -= pseudo[k:]

    # ---- evaluation -------------------------------------------------------------------------
    def _evaluate(self, round_idx: int, train_loss: float, elapsed: float) -> dict:
        """Evaluate every client now (the trained ones personalized too); returns the record."""
        ids = sorted(self.trained) if self.sim.personalization.evaluates_personalized else []
        matrix = play_evaluation(self.sim, round_idx, ids, self)
        assert matrix is not None  # rank 0 sent GO
        return self._record(round_idx, ids, matrix, train_loss, elapsed)

    def fill_eval(self, round_idx: int, trained: list[int]) -> dict:
        """The evaluation's broadcast payload (:func:`core.evaluation.eval_messages`): the global
        model evaluation reports, and the stored vector of each client of ``trained``."""
        sim = self.sim
        stored = [sim.rows.eval_vector(self.store.get(i, None)) for i in trained] if eval_width(sim) else []
        self._evaluated_global = self._global_for_evaluation()
        return {"global": self._evaluated_global[0], "personal": stored, "control": GO}

    def apply_eval(self, round_idx: int, trained: list[int], matrix: torch.Tensor) -> None:
        """Turn the reduced (num_clients, COLUMNS) ``matrix`` into the round's record: timing and
        dropped counts since the last evaluation, best.pt when it is the best so far."""
        record = self._record(round_idx, trained, matrix, self._loss, time.perf_counter() - self._t0)
        since_eval = self.since_eval
        record["sec_per_round"] = sum(since_eval["round_s"]) / len(since_eval["round_s"])
        record.update({key: list(values) for key, values in since_eval.items()})
        for values in since_eval.values():
            values.clear()
        if self.dp is not None:
            clipped, summed = (sum(c[i] for c in self.clip_counts) for i in (0, 1))
            record["privacy"] = self.dp.record(round_idx, clipped / summed if summed else None, self.last_clip_norm)
            self.clip_counts.clear()
        is_best = self._mark_best(record)
        self.history.append(record)
        self._tell("evaluated", record, self.sim.schedule.rounds)
        if is_best:
            self._checkpoint(round_idx, time.perf_counter() - self._t0, "best")

    def _record(self, round_idx: int, trained: list[int], matrix: torch.Tensor, train_loss: float,
                elapsed: float) -> dict:
        """The metrics record of an evaluation from its reduced (num_clients, COLUMNS) ``matrix``."""
        evaluated, formed = self._evaluated_global
        self.evaluated = round_idx
        self.last_matrix, self.last_trained = matrix.cpu().double().numpy(), trained
        record = {"round": round_idx, "train_loss": train_loss, "global_model": formed,
                  **evaluation_record(self.sim, evaluated, self.last_matrix, trained)}
        record["elapsed_s"] = elapsed
        return record

    def _global_for_evaluation(self) -> tuple[torch.Tensor, str]:
        """The global model evaluation reports (see :func:`core.evaluation.global_for_evaluation`)."""
        sim, p = self.sim, self.sim.personal_numel
        trained = sorted(self.trained) if p else []
        rows = torch.stack([self.store[i][:p] for i in trained]).to(sim.ctx.device) if trained else None
        return global_for_evaluation(sim, self.global_flat, rows, trained)

    # ---- the loop -----------------------------------------------------------------------------
    def _tell(self, event: str, *args) -> None:
        for observer in self.observers:
            getattr(observer, event)(*args)

    def run(self) -> list[dict]:
        """Run rounds ``start_round..max_iteration``; returns the evaluation records.

        Raises:
            Diverged: training diverged (see :meth:`_round`); the workers are released first, and
                metrics.jsonl, summary.md and the checkpoints keep what was reached before.
        """
        sim = self.sim
        exchange_start(sim, self.start_round)
        self._t0 = time.perf_counter() - self.elapsed_before
        self._tell("started", self.history, self.start_round, sim.schedule.rounds)
        try:
            run_rounds(sim, self.start_round, self)
        except RunStopped as exc:  # diverged, or the disk is full: the workers wait for a broadcast
            self._stop_workers(self.round)
            self._finish(time.perf_counter() - self._t0, str(exc) if isinstance(exc, Diverged) else None,
                         tell=isinstance(exc, Diverged))
            raise
        self._finish(time.perf_counter() - self._t0)
        return self.history

    def end_round(self, round_idx: int) -> None:
        """After the round and its evaluation: checkpoints/latest.pt when the schedule has one."""
        if self.sim.schedule.is_ckpt_round(round_idx):
            self._checkpoint(round_idx, time.perf_counter() - self._t0, "latest")
            self.saved_round = round_idx

    def _mark_best(self, record: dict) -> bool:
        """Set ``record["best"]``, the evaluation that chose best.pt so far (metric, round, value;
        None until one has a value), and return whether ``record`` is it. The metric is
        ``server_config.best_metric`` on the validation splits, or the global test accuracy without
        them (see :func:`core.evaluation.best_metric`)."""
        metric = best_metric(self.sim.cfg)
        is_best = improves(record, self.history, metric)
        earlier = self.history[-1].get("best") if self.history else None
        record["best"] = ({"metric": metric, "round": record["round"], "value": metric_value(record, metric)}
                          if is_best else earlier)
        return is_best

    def _stop_workers(self, r: int) -> None:
        """After round ``r``'s reduce (or its evaluation), send the workers the broadcast they wait
        for next (round ``r``'s evaluation, or round ``r + 1``) with the control value STOP, so they
        end at once."""
        sim = self.sim
        if sim.ctx.world_size == 1:
            return
        if sim.schedule.is_eval_round(r) and self.evaluated < r:
            message = eval_messages(sim, len(self.trained) if sim.personalization.evaluates_personalized else 0)[0]
        elif r < sim.schedule.rounds:
            message = RoundLayout(sim, r + 1).broadcast
        else:
            return
        buf = message.zeros(sim.ctx.device)
        message.view(buf, "control").fill_(STOP)
        sim.transport.broadcast(buf, f"round {r} stop broadcast")

    def _finish(self, wall_s: float, stopped: str | None = None, tell: bool = True) -> None:
        """Tell the observers how the run ended (``tell``: it reached its last round, or diverged and
        ``stopped`` says why), then close them and the client store."""
        try:
            if tell:
                self._tell("finished", RunOutcome(self.run_dir, self.history, getattr(self, "last_matrix", None),
                                                  getattr(self, "last_trained", []), wall_s, stopped,
                                                  self.sim.cfg.to_dict()))
        finally:
            self.close()

    def close(self) -> None:
        """Close the observers and the client store (the server is done with them)."""
        self._tell("close")
        self.store.close()

