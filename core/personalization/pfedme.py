"""pFedMe: personalized models as Moreau envelopes of the clients' losses."""
from __future__ import annotations

import torch
from pydantic import Field
from torch.func import functional_call

from core.local_run import LocalRun, StateParts
from core.personalization.base import NoPersonalization
from core.sections import MAX_COUNT
from core.vectorized import LossCall


class PFedMe(NoPersonalization):
    """pFedMe (T. Dinh, Tran and Nguyen 2020, "Personalized Federated Learning with Moreau
    Envelopes", arXiv:2006.08848), Algorithm 1.

    Each local step on a batch D first solves the client's inner problem approximately, with
    ``pfedme_k`` gradient steps of size ``pfedme_personal_lr`` (the paper's K and personal rate):
    ``theta <- theta - personal_lr * (grad f(theta; D) + lambda (theta - w))``, with lambda =
    ``pfedme_lambda``; then moves the local copy of the global model toward it,
    ``w <- w - lr * lambda * (w - theta)``, with lr the client optimizer's learning rate (the
    paper's eta). theta starts from the global model at each round and carries over from step to
    step within the round (as the authors' code does); the client's personalized model is theta
    after its last step, kept in the client store (``model``: a full model, buffers from w). The
    server's beta is ``server_config.optimizer_config.lr`` with server SGD (beta 1 = the average).

    The reported training loss is ``f(theta; D)`` of each step's last inner iteration. The client
    optimizer must be plain SGD (its momentum and weight decay would not apply: config check); a
    step costs K forward/backward passes.
    """

    name = "pfedme"
    summary = "Moreau-envelope personal models"
    evaluates_personalized = True
    eval_part = "model"

    class Options(NoPersonalization.Options):
        pfedme_lambda: float = Field(15.0, gt=0, description="pfedme: regularization lambda between personal and "
                                                             "local models")
        pfedme_k: int = Field(5, ge=1, le=MAX_COUNT, description="pfedme: gradient steps K of the inner problem "
                                                                 "per local step")
        pfedme_personal_lr: float = Field(0.09, gt=0, description="pfedme: step size of the inner problem")

    @classmethod
    def check(cls, cfg, readers):
        super().check(cfg, readers)
        opt = cfg.client_config.optimizer_config
        if opt.type != "sgd" or opt.momentum or opt.weight_decay:
            raise ValueError("personalization.method pfedme moves w by lr * lambda * (w - theta), a plain SGD step; "
                             "set client_config.optimizer_config to type sgd with momentum 0 and weight_decay 0")

    def model_state(self, layout):
        return StateParts({"model": layout.numel})

    def client_hook(self, trainer, round_idx, client_id, train_indices, global_flat, model):
        return _PFedMeClient(trainer, global_flat, self.cfg)

    def prepare_eval(self, trainer, round_idx, client_id, train_indices, global_flat, personal):
        trainer.layout.load_(personal)


class _PFedMeClient:
    """One client's pFedMe round: theta (the personal parameters), solved anew at every step."""

    def __init__(self, trainer, global_flat: torch.Tensor, cfg):
        self.trainer, self.cfg = trainer, cfg
        self.lr = trainer.optimizer.param_groups[0]["lr"]
        self.theta = [t.clone().requires_grad_() for t in trainer.layout.param_views(global_flat)]
        self.names = [f"model.{n}" for n, _ in trainer.model.named_parameters()]
        self.call = LossCall(trainer.model)

    def shape(self, run: LocalRun) -> LocalRun:
        """The client's run with :meth:`step` replacing the optimizer step."""
        return run.but(step=self.step)

    def step(self, batch: dict) -> torch.Tensor:
        """K inner steps on theta, then ``w <- w - lr * lambda * (w - theta)``; returns the last
        inner loss (0-dim)."""
        model, cfg = self.trainer.model, self.cfg
        w = [p for p in model.parameters()]
        buffers = {f"model.{n}": b for n, b in model.named_buffers()}
        for _ in range(cfg.pfedme_k):
            with torch.enable_grad(), torch.autocast(self.trainer.loader.device.type, dtype=torch.bfloat16,
                                                     enabled=self.trainer.bf16):
                loss = functional_call(self.call, (dict(zip(self.names, self.theta)), buffers), (batch,))
            grads = torch.autograd.grad(loss, self.theta)
            with torch.no_grad():
                for theta, grad, local in zip(self.theta, grads, w):
                    theta.sub_(cfg.pfedme_personal_lr * (grad + cfg.pfedme_lambda * (theta - local)))
        with torch.no_grad():
            for theta, local in zip(self.theta, w):
                if local.requires_grad:  # frozen parameters stay
                    local.sub_(self.lr * cfg.pfedme_lambda * (local - theta))
        return loss.detach()

    def result(self) -> torch.Tensor:
        """(N,) the personalized model: theta's parameters, then the replica's buffers."""
        flat = self.trainer.layout.flatten()
        k = self.trainer.layout.num_params
        return torch.cat([torch.cat([t.detach().reshape(-1) for t in self.theta]), flat[k:]])
