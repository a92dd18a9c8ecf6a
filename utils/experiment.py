"""Reload a run folder: its config, metrics, models (global or one client's personalized) and data.

    exp = Experiment("runs/my_run")
    model = exp.load_model(reload="best", client=7)      # eval mode, ready for model.inference(batch)
    data = exp.dataloaders(client=7)                      # data.test: batches of client 7's local test split
    record, matrix, trained = exp.evaluate("best")        # the engine's evaluation, run again

A run folder (:class:`utils.run_folder.RunFolder`) holds ``run.json`` (written by e2e_trainer.py): the
task, the data path (null for a task that reads no files) and the command lines that made it. Older
folders lack it; pass ``task`` and ``data_path`` then.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from core.config import apply_override, validate_config
from core.distributed import DistContext, Transport
from core.errors import UserError
from core.evaluation import eval_width, evaluation_record, fine_tune_new_client, share_of_evaluation
from core.flat import StateLayout
from core.personalization import build_personalization
from core.simulation import build_simulation, init_model
from core.task import load_task
from core.checkpoint import load_checkpoint
from utils.compare import load_run
from utils.run_folder import CHECKPOINTS, RunFolder

__all__ = ["Experiment", "ClientData", "Batches"]

# Keys an evaluation may change: the data section (another partition), how never-trained clients are
# fine-tuned, evaluation batch size, device and seed (the seed also draws the partition).
EVAL_KEYS = ("data_config.", "personalization.new_client_epochs", "server_config.eval_batch_size", "device", "seed")
PARTITION_KEYS = ("data_config.", "seed")


def _check_eval_override(assignment: str) -> str:
    key = assignment.split("=", 1)[0].strip()
    if "=" not in assignment or not any(key == k or (k.endswith(".") and key.startswith(k)) for k in EVAL_KEYS):
        raise UserError(f"--set {assignment!r}: evaluation may only change "
                        f"{', '.join(k + '*' if k.endswith('.') else k for k in EVAL_KEYS)} (key.path=value); "
                        f"the model and training keys come from the run")
    return key


@dataclass(frozen=True)
class Batches:
    """An iterable over batches (dicts of device tensors, e.g. cv: ``x`` (B, 3, 32, 32), ``y`` (B,))
    of the samples ``indices`` (int64, in order, no shuffling) through a task's data loader."""

    loader: object
    indices: torch.Tensor

    def __iter__(self):
        return iter(self.loader.batches(self.indices))

    @property
    def num_samples(self) -> int:
        return int(self.indices.numel())

    def __repr__(self) -> str:
        return f"Batches({self.num_samples} samples, batch size {self.loader.batch_size})"


@dataclass(frozen=True)
class ClientData:
    """A client's train and local test split (or the whole train and test sets for ``client=None``).
    ``train`` goes through the training loader (augmentation as configured, no shuffling)."""

    train: Batches
    test: Batches


class Experiment:
    """One run folder, reloaded in this process (world size 1) for inspection and evaluation.

    Args:
        run_dir: ``OUT/<run name>`` holding ``config.resolved.yaml`` (and ``checkpoints/``).
        task, data_path: override ``run.json`` (required for run folders that lack it).
        overrides: ``key.path=value`` changes limited to :data:`EVAL_KEYS`; a change of ``data_config``
            or ``seed`` makes a new partition, whose clients count as never trained.
        device: ``cpu``/``cuda``; default: the config's ``device`` (``auto``: a GPU when present).

    Raises:
        UserError: missing run folder or config, missing run.json without task/data_path, a
            disallowed or invalid override, an unknown task, ``cuda`` without a visible GPU.
    """

    def __init__(self, run_dir, task: str | None = None, data_path: str | None = None, overrides=(),
                 device: str | None = None):
        self.folder = RunFolder(run_dir)
        self.run_dir = self.folder.path
        config_path = self.folder.config
        if not config_path.is_file():
            what = "run folder" if not self.run_dir.is_dir() else "config.resolved.yaml in"
            raise UserError(f"{what} {self.run_dir if what == 'run folder' else config_path} not found; "
                            f"pass a run folder OUT/<run name> written by e2e_trainer.py")
        info = self.folder.read_info() if task is None or data_path is None else {}
        self.task = load_task(task or info["task"])
        self.data_path = data_path or info["dataPath"]
        raw = yaml.safe_load(config_path.read_text())
        raw["server_config"]["resume_from_checkpoint"] = None
        keys = [_check_eval_override(a) for a in overrides]
        for assignment in overrides:
            apply_override(raw, assignment)
        self.config = validate_config(raw, f"{config_path} with --set")
        self.overrides = list(overrides)
        self.partition_changed = any(k.startswith(PARTITION_KEYS) for k in keys)
        preference = device or self.config.device
        if preference == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda: no CUDA GPU is visible here; evaluate with -device cpu")
        self.device = torch.device("cuda" if preference != "cpu" and torch.cuda.is_available() else "cpu")
        self._sim = None
        self._states: dict[str, dict] = {}

    # ---- what the run wrote ------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        """The records of metrics.jsonl, one dict per evaluation, oldest first (keys: docs/experiments.md).

        Raises:
            UserError: when the run has no evaluation in metrics.jsonl yet, or a line there is not JSON.
        """
        return load_run(self.run_dir)["history"]

    def checkpoint(self, reload: str = "best") -> dict:
        """The checkpoint ``last`` (checkpoints/latest.pt) or ``best`` as a dict on the CPU.

        Raises:
            UserError: unknown ``reload``, or the file is missing.
        """
        if reload not in CHECKPOINTS:
            raise UserError(f"--reload {reload!r}: choose one of {', '.join(CHECKPOINTS)}")
        if reload not in self._states:
            path = self.folder.checkpoint(reload)
            if not path.is_file():
                others = [name for name, file in CHECKPOINTS.items() if (path.parent / file).is_file()]
                hint = f"try --reload {others[0]}" if others else "resume the run until it checkpoints"
                raise UserError(f"checkpoint {path} not found; the run has not written it yet "
                                f"(server_config.ckpt_freq) — {hint}")
            self._states[reload] = load_checkpoint(path)
        return self._states[reload]

    # ---- rebuilt pieces ----------------------------------------------------------------------
    def simulation(self):
        """The run's :class:`core.simulation.Simulation` in this process (loads and partitions the data
        once; built on first use).

        Raises:
            UserError: missing data (or no data folder for a task that reads files), impossible partition.
        """
        if self._sim is None:
            ctx = DistContext(0, 1, self.device, "gloo")
            self._sim = build_simulation(self.config, self.task, self.data_path, ctx, Transport(ctx))
        return self._sim

    def trained_clients(self, reload: str = "best") -> list[int]:
        """Sorted ids of the clients that had trained by the checkpoint's round and have a personalized
        model (empty for methods without one, or for a changed partition)."""
        sim = self.simulation()
        if self.partition_changed or not sim.personalization.evaluates_personalized:
            return []
        return sorted(sim.schedule.trained_through(self.checkpoint(reload)["round"]))

    def _personal_vector(self, state: dict, client: int) -> torch.Tensor | None:
        """(W,) what evaluation needs of a client's store entry (personal layers or Ditto's model)."""
        sim = self.simulation()
        if not eval_width(sim):
            return None
        entry = state["client_store"]["entries"].get(int(client))
        vector = sim.rows.eval_vector(entry)
        return None if vector is None else vector.to(self.device)

    def _personalize(self, reload: str, client: int) -> None:
        """Put ``client``'s personalized model into the simulation's replica, as evaluation does:
        the method's own preparation for a trained client; for a never-trained one, personal layers
        fine-tuned ``personalization.new_client_epochs`` epochs from the global model."""
        sim, state = self.simulation(), self.checkpoint(reload)
        round_idx, global_flat = state["round"], self.global_for_evaluation(reload)[0]
        if client in set(self.trained_clients(reload)):
            sim.personalization.prepare_eval(sim.trainer, round_idx, client, sim.train_clients.get(client), global_flat,
                                             self._personal_vector(state, client))
            return
        epochs = self.config.personalization.new_client_epochs
        if not epochs or not sim.personal_numel:
            raise UserError(f"client {client} has no personalized model at round {round_idx} (never trained, "
                            f"and personalization.new_client_epochs is 0 or the method has no personal layers); "
                            f"pass client=None or --set personalization.new_client_epochs=K")
        fine_tune_new_client(sim, round_idx, global_flat, client)

    def _check_client(self, client: int) -> int:
        n = self.config.data_config.num_clients
        if not 0 <= int(client) < n:
            raise UserError(f"client {client}: not a client id of this run; ids are 0..{n - 1}")
        return int(client)

    def load_model(self, reload: str = "best", client: int | None = None) -> torch.nn.Module:
        """A new model (the task's ``BaseModel``) in eval mode on :attr:`device`.

        ``client=None``: the global model of the checkpoint as the run evaluated it (no data loaded;
        with personal layers, those hold the trained clients' sample-weighted mean, see
        :meth:`global_for_evaluation`). ``client=c``: c's
        personalized model as the run evaluates it (global body with c's personal layers from the
        client store; Ditto: c's personal model; fine-tuning methods: fine-tuned on c's train split).
        With a method without personalization it is the global model.

        Raises:
            UserError: bad ``reload``, missing checkpoint, unknown client id, or a client without a
                personalized model (never trained and no ``new_client_epochs``).
        """
        state = self.checkpoint(reload)
        model = init_model(self.task, self.config, self.device)
        layout = StateLayout(model)
        client = None if client is None else self._check_client(client)
        if client is None or not build_personalization(self.config.personalization).evaluates_personalized:
            layout.load_(self.global_for_evaluation(reload)[0])
            return model.eval()
        self._personalize(reload, client)
        layout.load_(self.simulation().layout.flatten())
        return model.eval()

    def dataloaders(self, client: int | None = None) -> ClientData:
        """Batches of ``client``'s train split and local test split (``None``: the whole train and test
        sets), for this run's partition (or the overridden one).

        Raises:
            UserError: unknown client id, missing data.
        """
        sim = self.simulation()
        if client is None:
            train_all = torch.arange(len(sim.trainer.loader.dataset.labels), device=self.device)
            test_all = torch.arange(len(sim.test_loader.dataset.labels), device=self.device)
            return ClientData(Batches(sim.trainer.loader, train_all), Batches(sim.test_loader, test_all))
        cid = self._check_client(client)
        return ClientData(Batches(sim.trainer.loader, sim.train_clients.get(cid)),
                          Batches(sim.test_loader, sim.test_clients.get(cid)))

    def evaluate(self, reload: str = "best") -> tuple[dict, np.ndarray, list[int]]:
        """Evaluate the checkpoint with the engine's evaluation (core/evaluation.py), in one process.

        Returns:
            ``(record, matrix, trained)``: ``record`` has the keys of a metrics.jsonl record
            (``round``, ``global_test_acc``, ``global_local``, ``personalized``, ``new_clients``...,
            accuracies as fractions); ``matrix`` (num_clients, 12) float64 per client: correct global,
            correct personalized, test samples, correct new-client model, then on the validation
            split correct global, correct personalized, samples, global and personalized loss sums,
            then on the test split global and personalized loss sums and the samples they cover
            (columns named in core/evaluation.py); ``trained``: the ids whose
            personalized model was evaluated.
        """
        state, sim = self.checkpoint(reload), self.simulation()
        global_flat, formed = self.global_for_evaluation(reload)
        trained = self.trained_clients(reload)
        width = eval_width(sim)
        personal = (torch.stack([self._personal_vector(state, c) for c in trained]) if width and trained
                    else torch.zeros(len(trained), width, device=global_flat.device))
        matrix = share_of_evaluation(sim, state["round"], global_flat, personal, trained)
        matrix = matrix.cpu().double().numpy()
        return ({"round": state["round"], "global_model": formed, **evaluation_record(sim, global_flat, matrix, trained)},
                matrix, trained)

    def global_for_evaluation(self, reload: str = "best") -> tuple[torch.Tensor, str]:
        """The checkpoint's global model as the run evaluated it, (N,) on the device, and how it was
        formed: with personal layers, those positions hold the train-sample-weighted mean of the
        trained clients' own, saved with the checkpoint (:func:`core.evaluation.global_for_evaluation`).
        A checkpoint written before that was saved gives the aggregated model, and says so."""
        state, sim = self.checkpoint(reload), self.simulation()
        global_flat = state["global"].to(self.device)
        if "evaluated_personal" not in state:
            return global_flat, "as aggregated (this checkpoint predates the evaluated global model)"
        evaluated = global_flat.clone()
        evaluated[sim.personal_index] = state["evaluated_personal"].to(self.device)
        return evaluated, state["global_model"]

    def recorded(self, round_idx: int) -> dict | None:
        """The metrics.jsonl record of ``round_idx`` (None when that round was not evaluated)."""
        path = self.folder.metrics
        records = self.metrics() if path.is_file() and path.read_text().strip() else []
        return next((r for r in records if r["round"] == round_idx), None)
