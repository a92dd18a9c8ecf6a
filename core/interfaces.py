"""The typed interfaces the engine relies on (structural: a class conforms by having the members;
nothing needs to inherit from these). The built-in implementations are in core/strategy/,
core/personalization/, core/task.py and core/dataset.py; ``mypy`` (mypy.ini) checks core/.

Shapes: N is the flat state's length (``StateLayout.numel``), K the number of clients of a call,
P a personal-layer slice, C / S the per-client / server strategy state.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from core.local_run import LocalRun, RunInputs, StateParts


class Strategy(Protocol):
    """How client updates are weighted, how a client's run is shaped, and how the summed deltas
    become a pseudo-gradient (see core/strategy/fedavg.py). State is declared by name
    (:class:`core.local_run.StateParts`); hooks receive name -> view mappings."""

    name: str
    summary: str
    relative_weights: bool  # weights are exp(log_weight), defined up to a common factor (DGA)
    exact_sum: bool  # weights known before training, so the sum is taken in fixed point
    dp_refusal: str | None  # why central DP cannot run it (None: it can)

    def client_weight(self, num_samples: Any, train_loss: torch.Tensor) -> Any:
        """A client's weight (a float for one client, a (K,) tensor for K)."""

    def cohort_weights(self, num_samples: Any) -> np.ndarray:
        """(K,) float64 weights of a cohort, known before training."""

    def pseudo_gradient(self, delta_sum: torch.Tensor, weight_sum: Any,
                        server: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N,) pseudo-gradient from the weighted delta sum, the weight sum and the new server state."""

    def client_state(self, layout: Any) -> StateParts:
        """Named per-client state in the client store (C floats in all)."""

    def server_state(self, layout: Any) -> StateParts:
        """Named server state broadcast every round (S floats in all)."""

    def shape_run(self, run: LocalRun, inputs: RunInputs) -> LocalRun:
        """The client's training run with the strategy's penalty or correction."""

    def new_client_state(self, inputs: RunInputs, trained_params: torch.Tensor, steps: int,
                         lr: float) -> dict[str, torch.Tensor]:
        """The client's state (by name) after local training."""

    def new_server_state(self, server: Mapping[str, torch.Tensor], change_sum: Mapping[str, torch.Tensor],
                         num_clients: int) -> dict[str, torch.Tensor]:
        """The server state (by name) after a round."""


class ClientHook(Protocol):
    """A personalization method's per-client companion during local training (Ditto, APFL, pFedMe)."""

    def shape(self, run: LocalRun) -> LocalRun:
        """The client's run with the method's step hook or step."""

    def result(self) -> torch.Tensor:
        """The client's new (M,) model state."""


class Personalization(Protocol):
    """What a personalization method keeps local, how it trains and how it is evaluated (see
    core/personalization/base.py)."""

    name: str
    summary: str
    evaluates_personalized: bool
    keeps_layers_local: bool
    eval_part: str  # what evaluation reads of a store row: "personal" layers or the "model" state
    local_layers: Any

    def training_phases(self, local_epochs: int) -> list[tuple[int, str]]:
        """(epochs, which parameters train) per phase of local training."""

    def local_run(self, local_epochs: int) -> LocalRun:
        """The client's training run before hooks shape it."""

    def prepare_eval(self, trainer: Any, round_idx: int, client_id: int, train_indices: torch.Tensor,
                     global_flat: torch.Tensor, personal: torch.Tensor | None) -> None:
        """Leave the client's personalized model in the trainer's replica."""

    def model_state(self, layout: Any) -> StateParts:
        """Named separate personal model per client (M floats in all)."""

    def initial_model_state(self, global_flat: torch.Tensor, layout: Any) -> torch.Tensor:
        """(M,) a never-trained client's personal model state."""

    def client_hook(self, trainer: Any, round_idx: int, client_id: int, train_indices: torch.Tensor,
                    global_flat: torch.Tensor, model: Mapping[str, torch.Tensor]) -> ClientHook | None:
        """The per-client companion of local training (None: none)."""

    def personal_names(self, layout: Any, model: torch.nn.Module) -> list[str]:
        """Names of the state entries kept on each client."""

    @property
    def has_personal_layers(self) -> bool:
        """Whether the method keeps layers local."""


class DataLoader(Protocol):
    """Turns a client's sample indices into batches on the device (see core.dataset.BaseDataLoader)."""

    batch_size: int
    device: torch.device

    def batches(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> Iterator[dict]:
        """Batches over ``indices``, shuffled when a generator is given."""


class Task(Protocol):
    """A task folder: its model classes, dataset and loader (see core.task.Task)."""

    name: str
    folder: Path
    models: dict
    dataset_cls: type
    dataloader_cls: type

    def build_model(self, model_config: Any) -> torch.nn.Module:
        """The model ``model_config.model_type`` names."""
