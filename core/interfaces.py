"""The typed interfaces the engine relies on (structural: a class conforms by having the members;
nothing needs to inherit from these). The built-in implementations are in core/strategy.py,
core/personalization.py, core/task.py and core/dataset.py; ``mypy`` (mypy.ini) checks core/.

Shapes: N is the flat state's length (``StateLayout.numel``), K the number of clients of a call,
P a personal-layer slice, C / S the per-client / server strategy state.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class Strategy(Protocol):
    """How client updates are weighted, corrected and turned into a pseudo-gradient."""

    name: str
    has_local_penalty: bool
    relative_weights: bool  # weights are exp(log_weight), defined up to a common factor (DGA)
    exact_sum: bool  # weights known before training, so the sum is taken in fixed point

    def client_weight(self, num_samples: Any, train_loss: torch.Tensor) -> Any:
        """A client's weight (a float for one client, a (K,) tensor for K)."""

    def cohort_weights(self, num_samples: Any) -> np.ndarray:
        """(K,) float64 weights of a cohort, known before training."""

    def pseudo_gradient(self, delta_sum: torch.Tensor, weight_sum: Any) -> torch.Tensor:
        """(N,) pseudo-gradient from the weighted delta sum and the weight sum."""

    def local_penalty(self, params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor | None:
        """A term added to every local step's loss (None: nothing)."""

    def client_state_numel(self, layout: Any) -> int:
        """C: floats of per-client strategy state in the client store (0: none)."""

    def server_state_numel(self, layout: Any) -> int:
        """S: floats of server strategy state broadcast every round (0: none)."""

    def gradient_correction(self, server_state: torch.Tensor, client_state: torch.Tensor) -> torch.Tensor | None:
        """(num_params,) correction c applied as ``-lr * c`` after every local step (None: none)."""

    def new_client_state(self, server_state: torch.Tensor, client_state: torch.Tensor, global_params: torch.Tensor,
                         trained_params: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        """(C,) the client's state after local training."""

    def new_server_state(self, server_state: torch.Tensor, client_state_change_sum: torch.Tensor,
                         num_clients: int) -> torch.Tensor:
        """(S,) the server state after a round."""


class ClientHook(Protocol):
    """A personalization method's per-client companion during local training (Ditto, APFL)."""

    def step(self, batch: dict) -> None:
        """After each local step on ``batch``."""

    def result(self) -> torch.Tensor:
        """The client's new (M,) model state."""


class Personalization(Protocol):
    """What a personalization method keeps local, how it trains and how it is evaluated."""

    name: str
    evaluates_personalized: bool
    keeps_layers_local: bool
    local_layers: Any

    def training_phases(self, local_epochs: int) -> list[tuple[int, str]]:
        """(epochs, which parameters train) per phase of local training."""

    def prepare_eval(self, trainer: Any, round_idx: int, client_id: int, train_indices: torch.Tensor,
                     global_flat: torch.Tensor, personal: torch.Tensor | None) -> None:
        """Leave the client's personalized model in the trainer's replica."""

    def model_state_numel(self, layout: Any) -> int:
        """M: floats of a separate personal model per client (0: none)."""

    def initial_model_state(self, global_flat: torch.Tensor, layout: Any) -> torch.Tensor:
        """(M,) a never-trained client's personal model state."""

    def client_hook(self, trainer: Any, round_idx: int, client_id: int, train_indices: torch.Tensor,
                    global_flat: torch.Tensor, model_state: torch.Tensor) -> ClientHook | None:
        """The per-client companion of local training (None: none)."""

    def eval_vector(self, entry: torch.Tensor | None, personal_numel: int, strategy_numel: int) -> torch.Tensor:
        """What evaluation needs of a client's store entry."""

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
