"""Personalization methods: which parameters stay on each client, declared as data.

A method's personal tensors are never averaged: each client keeps its own copy in the client store
(its first copy comes from the global model), trains it with the rest, and the "personalized model"
of a client is the global model with its personal tensors written over it.
"""
from __future__ import annotations

from torch import nn

from core.errors import UserError


class NoPersonalization:
    """Plain FedAvg: every parameter is global; the personalized model is the global model."""

    name = "none"
    personal_module_types: tuple = ()

    evaluates_personalized = False
    keeps_layers_local = False

    def __init__(self, cfg):
        self.local_layers = list(cfg.local_layers)
        self.cfg = cfg

    def training_phases(self, local_epochs: int) -> list[tuple[int, str]]:
        """(epochs, which parameters train: ``all``, ``personal`` or ``shared``) of one client's round."""
        return [(local_epochs, "all")]

    def prepare_eval(self, trainer, round_idx: int, client_id: int, train_indices, global_flat, personal) -> None:
        """Put the client's personalized model in the replica before it is evaluated."""
        trainer.load(global_flat, personal)

    def model_state_numel(self, layout) -> int:
        """Floats of a separate personal model kept per client in the client store (0: none)."""
        return 0

    def eval_vector(self, entry, personal_numel: int, strategy_numel: int):
        """The part of a client-store entry that evaluation needs (default: the personal layers)."""
        return entry[:personal_numel]

    def personal_names(self, layout, model: nn.Module) -> list[str]:
        """Names (parameters and buffers) of the personal tensors."""
        return [f"{m}.{t}" if m else t for m, mod in model.named_modules()
                if isinstance(mod, self.personal_module_types)
                for t, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))]

    @property
    def has_personal_layers(self) -> bool:
        return self.keeps_layers_local


class FedPer(NoPersonalization):
    """FedPer (Arivazhagan et al. 2019, arXiv:1912.00818): the layers named by ``local_layers``
    (module-name prefixes, usually the head, e.g. ``linear``) are personal; the body is shared."""

    name = "fedper"
    evaluates_personalized = True
    keeps_layers_local = True

    def personal_names(self, layout, model):
        return layout.names_matching(self.local_layers)


class LGFedAvg(FedPer):
    """LG-FedAvg (Liang et al. 2020, arXiv:2001.01523): local representation layers, global head.
    ``local_layers`` names the local body modules (the complement of FedPer's choice)."""

    name = "lgfedavg"


class FedBN(NoPersonalization):
    """FedBN (Li et al. 2021, arXiv:2102.07623): every BatchNorm layer (affine parameters and running
    statistics) stays local; everything else is averaged."""

    name = "fedbn"
    evaluates_personalized = True
    keeps_layers_local = True
    personal_module_types = (nn.modules.batchnorm._BatchNorm,)


class LocalOnly(NoPersonalization):
    """Local training only: every tensor is personal, nothing is federated (the lower baseline
    every personalization method must beat). The global model stays at its initialisation."""

    name = "local"
    evaluates_personalized = True
    keeps_layers_local = True

    def personal_names(self, layout, model):
        return list(layout.names)


class FedRep(FedPer):
    """FedRep (Collins et al. 2021, arXiv:2102.07078): each round a client first trains only its
    personal head (``local_layers``) for ``head_epochs`` epochs with the body frozen, then only the
    shared body for ``local_epochs`` epochs with the head frozen; the body is averaged."""

    name = "fedrep"

    def training_phases(self, local_epochs):
        return [(self.cfg.head_epochs, "personal"), (local_epochs, "shared")]


class FineTune(NoPersonalization):
    """Fine-tuning: plain FedAvg training; before a client is evaluated, the global model is
    trained for ``finetune_epochs`` epochs on the client's train split (all parameters, the client
    optimizer, a data order seeded apart from training). Nothing is stored between rounds."""

    name = "finetune"
    evaluates_personalized = True

    def prepare_eval(self, trainer, round_idx, client_id, train_indices, global_flat, personal):
        trainer.train(round_idx, client_id, train_indices, global_flat, None, epochs=self.cfg.finetune_epochs,
                      stream=1)


class Ditto(NoPersonalization):
    """Ditto (Li et al. 2021, arXiv:2012.04662): the global model is trained as in FedAvg; besides,
    each client keeps a whole personal model v (first copy: the global model) and each round trains
    it for ``ditto_epochs`` epochs on ``loss(v) + lambda/2 ||v - w_global||^2`` (``ditto_lambda``).
    The personalized model is v. The client store holds one full model per trained client."""

    name = "ditto"
    evaluates_personalized = True

    def model_state_numel(self, layout):
        return layout.numel

    def eval_vector(self, entry, personal_numel, strategy_numel):
        return entry[personal_numel + strategy_numel:]

    def train_personal_model(self, trainer, round_idx, client_id, train_indices, global_flat, personal_model):
        """Train the client's personal model (left in the replica) with the proximal term to the global."""
        trainer.train(round_idx, client_id, train_indices, personal_model, None, epochs=self.cfg.ditto_epochs,
                      stream=3, prox=(self.cfg.ditto_lambda, global_flat))

    def prepare_eval(self, trainer, round_idx, client_id, train_indices, global_flat, personal):
        trainer.layout.load_(personal)


METHODS = {cls.name: cls for cls in (NoPersonalization, FedPer, FedRep, LGFedAvg, FedBN, LocalOnly, FineTune, Ditto)}


def build_personalization(cfg):
    """The method named by ``personalization.method``, configured by the ``personalization`` section."""
    if cfg.method not in METHODS:
        raise UserError(f"personalization.method: unknown {cfg.method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)
