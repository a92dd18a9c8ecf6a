"""The base personalization method (plain FedAvg: nothing personal) and the method interface.

A method's personal tensors are never averaged: each client keeps its own copy in the client store
(its first copy comes from the global model), trains it with the rest, and the "personalized model"
of a client is the global model with its personal tensors written over it. A method may also keep
a separate personal model (declared by :meth:`NoPersonalization.model_state`) and shape the
client's local run (:meth:`NoPersonalization.client_hook`).
"""
from __future__ import annotations

from typing import Mapping

import torch
from pydantic import Field
from torch import nn

from core.local_run import LocalRun, StateParts
from core.sections import MAX_EPOCHS, Section


class NoPersonalization:
    """Plain FedAvg: every parameter is global; the personalized model is the global model.

    A method is one module: its options (:class:`Options`, merged into the ``personalization``
    section), its config check (:meth:`check`), its named per-client model state
    (:meth:`model_state`) and its hooks.
    """

    name = "none"
    summary = "FedAvg"
    personal_module_types: tuple = ()
    uses_local_layers = False  # True: the method's personal layers are the ones local_layers names

    evaluates_personalized = False
    keeps_layers_local = False
    eval_part = "personal"  # what evaluation reads of a store row: the personal layers, or "model" (its model state)

    class Options(Section):
        local_layers: list[str] = Field(default_factory=list, description="module-name prefixes kept on each client")
        new_client_epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="epochs fine-tuning the personal layers "
                                       "of never-trained clients before evaluating them (0: not evaluated)")

    def __init__(self, cfg):
        self.local_layers = list(cfg.local_layers)
        self.cfg = cfg

    @classmethod
    def check(cls, cfg, readers: str) -> None:
        """Refuse a config (:class:`core.config.Config`) the method cannot run, with a ValueError
        naming the fields and the fix; ``readers`` lists the methods that read local_layers."""
        layers = cfg.personalization.local_layers
        if cls.uses_local_layers and not layers:
            raise ValueError(f"personalization: method {cls.name} needs local_layers, e.g. [linear]")
        if not cls.uses_local_layers and layers:
            raise ValueError(f"personalization: local_layers is set but method {cls.name} chooses its own; remove "
                             f"local_layers or use method {readers}")

    def training_phases(self, local_epochs: int) -> list[tuple[int, str]]:
        """(epochs, which parameters train: ``all``, ``personal`` or ``shared``) of one client's round."""
        return [(local_epochs, "all")]

    def local_run(self, local_epochs: int) -> LocalRun:
        """A client's training run before any hook shapes it: :meth:`training_phases` on stream 0."""
        return LocalRun(phases=tuple(self.training_phases(local_epochs)))

    def prepare_eval(self, trainer, round_idx: int, client_id: int, train_indices, global_flat, personal) -> None:
        """Put the client's personalized model in the replica before it is evaluated (``personal``:
        the part of its store row named by :attr:`eval_part`)."""
        trainer.load(global_flat, personal)

    def model_state(self, layout) -> StateParts:
        """Named separate personal model kept per client in the client store (none here)."""
        return StateParts()

    def initial_model_state(self, global_flat: torch.Tensor, layout) -> torch.Tensor:
        """A never-trained client's (M,) model state (only with a declared model state)."""
        return global_flat

    def client_hook(self, trainer, round_idx: int, client_id: int, train_indices, global_flat,
                    model: Mapping[str, torch.Tensor]):
        """Per-client work on the model state (name -> view) around the client's training (only
        with a declared model state). Returns an object with ``shape(run) -> LocalRun`` (the
        client's run, with a step hook or step of the method) and ``result()`` (the new (M,)
        model state, read after the client's training)."""
        raise NotImplementedError

    def personal_names(self, layout, model: nn.Module) -> list[str]:
        """Names (parameters and buffers) of the personal tensors."""
        return [f"{m}.{t}" if m else t for m, mod in model.named_modules()
                if isinstance(mod, self.personal_module_types)
                for t, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))]

    @property
    def has_personal_layers(self) -> bool:
        return self.keeps_layers_local


class Done:
    """A client hook whose result is ready before the client's training (the run is unchanged)."""

    def __init__(self, state: torch.Tensor):
        self.state = state

    def shape(self, run: LocalRun) -> LocalRun:
        return run

    def result(self) -> torch.Tensor:
        return self.state
