"""Personalization methods: which parameters stay on each client, declared as data.

A method's personal tensors are never averaged: each client keeps its own copy in the client store
(its first copy comes from the global model), trains it with the rest, and the "personalized model"
of a client is the global model with its personal tensors written over it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from core.errors import UserError
from core.vectorized import LossCall


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

    def initial_model_state(self, global_flat: torch.Tensor, layout) -> torch.Tensor:
        """A never-trained client's (M,) model state (only when model_state_numel > 0)."""
        return global_flat

    def client_hook(self, trainer, round_idx, client_id, train_indices, global_flat, model_state):
        """Per-client work on the (M,) model state around the client's training (model_state_numel > 0).

        Returns an object with ``step`` (a per-step hook for :meth:`ClientTrainer.train`, or None)
        and ``result()`` (the new (M,) model state, read after the client's training).
        """
        raise NotImplementedError

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
    """Ditto (Li et al. 2021, arXiv:2012.04221): the global model is trained as in FedAvg; besides,
    each client keeps a whole personal model v (first copy: the global model) and each round trains
    it for ``ditto_epochs`` epochs on ``loss(v) + lambda/2 ||v - w_global||^2`` (``ditto_lambda``).
    The personalized model is v. The client store holds one full model per trained client."""

    name = "ditto"
    evaluates_personalized = True

    def model_state_numel(self, layout):
        return layout.numel

    def eval_vector(self, entry, personal_numel, strategy_numel):
        return entry[personal_numel + strategy_numel:]

    def client_hook(self, trainer, round_idx, client_id, train_indices, global_flat, model_state):
        """Train the personal model v with the proximal term to the round's global model, before
        (and independently of) the client's global-model training: v's update does not depend on it."""
        trainer.train(round_idx, client_id, train_indices, model_state, None, epochs=self.cfg.ditto_epochs,
                      stream=3, prox=(self.cfg.ditto_lambda, global_flat))
        return _Done(trainer.layout.flatten())

    def prepare_eval(self, trainer, round_idx, client_id, train_indices, global_flat, personal):
        trainer.layout.load_(personal)


class _Done:
    """A client hook whose result is ready before the client's training (no per-step work)."""

    step = None

    def __init__(self, state: torch.Tensor):
        self.state = state

    def result(self) -> torch.Tensor:
        return self.state


class APFL(NoPersonalization):
    """APFL, adaptive personalized federated learning (Deng et al. 2020, arXiv:2003.13461).

    Each client keeps a personal model v (its parameters, first copy: the global model) and a
    mixing weight alpha in [0, 1] (first value ``apfl_alpha``). Its personalized model is
    ``alpha * v + (1 - alpha) * w`` (parameters mixed; buffers from w). At every local step, on the
    same batch and from the same starting weights, the local copy w of the global model takes its
    usual optimizer step on ``loss(w)``, v takes a plain SGD step (client lr) on ``loss(mixture)``,
    and alpha a projected gradient step (``apfl_alpha_lr``, default the client lr) on the same
    loss. Only w is averaged. The client store holds v and alpha: (num_params + 1,) floats per
    client. BatchNorm statistics of the mixture forward are not kept. Costs one extra
    forward/backward per step.
    """

    name = "apfl"
    evaluates_personalized = True

    def model_state_numel(self, layout):
        return layout.num_params + 1

    def initial_model_state(self, global_flat, layout):
        return torch.cat([global_flat[:layout.num_params], torch.tensor([self.cfg.apfl_alpha])])

    def eval_vector(self, entry, personal_numel, strategy_numel):
        return entry[personal_numel + strategy_numel:]

    def client_hook(self, trainer, round_idx, client_id, train_indices, global_flat, model_state):
        lr = trainer.optimizer.param_groups[0]["lr"]
        alpha_lr = self.cfg.apfl_alpha_lr if self.cfg.apfl_alpha_lr is not None else lr
        return _APFLClient(trainer, model_state, lr, alpha_lr)

    def prepare_eval(self, trainer, round_idx, client_id, train_indices, global_flat, personal):
        k = trainer.layout.num_params
        alpha = personal[k]
        mixed = global_flat.clone()
        mixed[:k] = alpha * personal[:k] + (1 - alpha) * global_flat[:k]
        trainer.layout.load_(mixed)


class _APFLClient:
    """One client's APFL state during its round: personal parameters v and the mixing weight alpha."""

    def __init__(self, trainer, model_state: torch.Tensor, lr: float, alpha_lr: float):
        k = trainer.layout.num_params
        self.trainer, self.lr, self.alpha_lr = trainer, lr, alpha_lr
        self.v = [t.clone().requires_grad_() for t in trainer.layout.param_views(model_state)]
        self.alpha = model_state[k].clone().requires_grad_()
        self.named = list(trainer.model.named_parameters())
        self.call = LossCall(trainer.model)

    def step(self, batch: dict) -> None:
        """One SGD step of v and one projected step of alpha on ``loss(alpha v + (1 - alpha) w)``."""
        model = self.trainer.model
        mixed = {f"model.{n}": self.alpha * v + (1 - self.alpha) * w.detach()
                 for (n, w), v in zip(self.named, self.v)}
        buffers = {f"model.{n}": b.clone() for n, b in model.named_buffers()}
        with torch.enable_grad(), torch.autocast(self.trainer.loader.device.type, dtype=torch.bfloat16,
                                                 enabled=self.trainer.bf16):
            loss = functional_call(self.call, (mixed, buffers), (batch,))
        grads = torch.autograd.grad(loss, self.v + [self.alpha])
        with torch.no_grad():
            torch._foreach_add_(self.v, list(grads[:-1]), alpha=-self.lr)
            self.alpha.sub_(self.alpha_lr * grads[-1]).clamp_(0.0, 1.0)

    def result(self) -> torch.Tensor:
        """(num_params + 1,) new model state: v flattened, then alpha."""
        return torch.cat([v.detach().reshape(-1) for v in self.v] + [self.alpha.detach().view(1)])


METHODS = {cls.name: cls for cls in (NoPersonalization, FedPer, FedRep, LGFedAvg, FedBN, LocalOnly, FineTune, Ditto,
                                     APFL)}


def build_personalization(cfg):
    """The method named by ``personalization.method``, configured by the ``personalization`` section."""
    if cfg.method not in METHODS:
        raise UserError(f"personalization.method: unknown {cfg.method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)
