"""APFL: a learned mixture of a personal and the global model."""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch.func import functional_call

from core.local_run import LocalRun, StateParts
from core.personalization.base import NoPersonalization
from core.vectorized import LossCall


class APFL(NoPersonalization):
    """APFL, adaptive personalized federated learning (Deng et al. 2020, arXiv:2003.13461).

    Each client keeps a personal model v (its parameters ``v``, first copy: the global model) and a
    mixing weight ``alpha`` in [0, 1] (first value ``apfl_alpha``). Its personalized model is
    ``alpha * v + (1 - alpha) * w`` (parameters mixed; buffers from w). At every local step, on the
    same batch and from the same starting weights, the local copy w of the global model takes its
    usual optimizer step on ``loss(w)``, v takes a plain SGD step (client lr) on ``loss(mixture)``,
    and alpha a projected gradient step (``apfl_alpha_lr``, default the client lr) on the same
    loss. Only w is averaged. The client store holds v and alpha: (num_params + 1,) floats per
    client. BatchNorm statistics of the mixture forward are not kept. Costs one extra
    forward/backward per step.
    """

    name = "apfl"
    summary = "learned personal/global mixture"
    evaluates_personalized = True
    eval_part = "model"

    class Options(NoPersonalization.Options):
        apfl_alpha: float = Field(0.5, ge=0, le=1, description="apfl: first mixing weight alpha of every client")
        apfl_alpha_lr: Optional[float] = Field(None, ge=0, description="apfl: step size of alpha (null: the client lr)")

    def model_state(self, layout):
        return StateParts({"v": layout.num_params, "alpha": 1})

    def initial_model_state(self, global_flat, layout):
        return torch.cat([global_flat[:layout.num_params], torch.tensor([self.cfg.apfl_alpha])])

    def client_hook(self, trainer, round_idx, client_id, train_indices, global_flat, model):
        lr = trainer.optimizer.param_groups[0]["lr"]
        alpha_lr = self.cfg.apfl_alpha_lr if self.cfg.apfl_alpha_lr is not None else lr
        return _APFLClient(trainer, model, lr, alpha_lr)

    def prepare_eval(self, trainer, round_idx, client_id, train_indices, global_flat, personal):
        k = trainer.layout.num_params
        alpha = personal[k]
        mixed = global_flat.clone()
        mixed[:k] = alpha * personal[:k] + (1 - alpha) * global_flat[:k]
        trainer.layout.load_(mixed)


class _APFLClient:
    """One client's APFL state during its round: personal parameters v and the mixing weight alpha."""

    def __init__(self, trainer, model: dict, lr: float, alpha_lr: float):
        self.trainer, self.lr, self.alpha_lr = trainer, lr, alpha_lr
        self.v = [t.clone().requires_grad_() for t in trainer.layout.param_views(model["v"])]
        self.alpha = model["alpha"][0].clone().requires_grad_()
        self.named = list(trainer.model.named_parameters())
        self.call = LossCall(trainer.model)

    def shape(self, run: LocalRun) -> LocalRun:
        """The client's run with :meth:`step` as its step hook."""
        return run.but(step_hook=self.step)

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
