"""What the server tells the world: a run observer receives the run's events and records, and
writes them wherever it likes (metrics.jsonl, TensorBoard, W&B, the console, summary.md, plots).

The engine writes nothing itself but its checkpoints (they are what a resume restarts from). The
observers of a command-line run are the run folder's (``utils.run_folder.RunFolder.opener``: its
lock, checks, config.resolved.yaml and run.json, at :meth:`RunObserver.opening`) and those of
``utils.outputs.run_outputs``; a run built in code (tests, benchmarks) may pass none.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class RunOutcome:
    """How a run ended, for :meth:`RunObserver.finished`.

    ``history``: the evaluation records (dicts, as in metrics.jsonl); ``matrix``: the last
    evaluation's per-client matrix ((num_clients, COLUMNS) float64, see core/evaluation.py) or None;
    ``trained``: the client ids whose personalized model that evaluation measured; ``wall_s``:
    seconds of the run (a resumed run's include those before the resume); ``stopped``: why the run
    stopped early (divergence), or None when it reached its last round; ``config``: the resolved
    config as plain data.
    """

    run_dir: Path
    history: list[dict]
    matrix: np.ndarray | None
    trained: list[int]
    wall_s: float
    stopped: str | None
    config: dict


@dataclass(frozen=True)
class RunStart:
    """What a run built on every rank is, for :meth:`RunObserver.opening`.

    ``state_numel``: floats of the flat global state (parameters, then buffers); ``store_width``:
    floats of a client-store row (personal layers, strategy state, separate personal model);
    ``world_size``: the processes of the run; ``resume``: the checkpoint it continues (None: a new run).
    """

    state_numel: int
    store_width: int
    world_size: int
    resume: Path | None


class RunObserver:
    """Receives the run's events in order: :meth:`opening` once, :meth:`started` once, then per round
    :meth:`round_done` and, on evaluation rounds, :meth:`evaluated`; :meth:`finished` when the run
    reached its end or diverged (not after a full disk, an interrupt or a dead peer); :meth:`close`
    always last once the server is built (not when an :meth:`opening` failed). Every method does
    nothing by default.
    """

    def opening(self, start: RunStart) -> None:
        """Once every rank has built the run, before the server reads a checkpoint or writes anything,
        observer after observer in order. A UserError raised here stops every rank at once."""

    def started(self, history: list[dict], start_round: int, rounds: int) -> None:
        """Before round ``start_round`` of ``rounds``; ``history`` holds the records a resume restored."""

    def round_done(self, round_idx: int, train_loss: float) -> None:
        """After round ``round_idx``'s aggregation; ``train_loss`` is the clients' weighted mean."""

    def evaluated(self, record: dict, rounds: int) -> None:
        """After an evaluation: ``record`` is the new metrics.jsonl record (already in the history)."""

    def finished(self, outcome: RunOutcome) -> None:
        """The run ended (its last round, or a divergence: ``outcome.stopped``)."""

    def close(self) -> None:
        """Release what the observer holds (files, progress bars, W&B runs)."""
