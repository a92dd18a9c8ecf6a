"""Ditto: a regularized personal model per client beside the global one."""
from __future__ import annotations

from pydantic import Field

from core.local_run import StateParts, epochs_of, proximal
from core.personalization.base import Done, NoPersonalization
from core.sections import MAX_EPOCHS


class Ditto(NoPersonalization):
    """Ditto (Li et al. 2021, arXiv:2012.04221): the global model is trained as in FedAvg; besides,
    each client keeps a whole personal model v (``model``; first copy: the global model) and each
    round trains it for ``ditto_epochs`` epochs on ``loss(v) + lambda/2 ||v - w_global||^2``
    (``ditto_lambda``). The personalized model is v. The client store holds one full model per
    trained client."""

    name = "ditto"
    summary = "regularized personal models"
    evaluates_personalized = True
    eval_part = "model"

    class Options(NoPersonalization.Options):
        ditto_lambda: float = Field(0.1, ge=0, description="ditto: weight of ||v - w_global||^2 in personal training")
        ditto_epochs: int = Field(1, ge=1, le=MAX_EPOCHS, description="ditto: epochs of personal-model training "
                                                                      "per round")

    def model_state(self, layout):
        return StateParts({"model": layout.numel})

    def client_hook(self, trainer, round_idx, client_id, train_indices, global_flat, model):
        """Train the personal model v with the proximal term to the round's global model, before
        (and independently of) the client's global-model training: v's update does not depend on it."""
        run = epochs_of(self.cfg.ditto_epochs, stream=3).but(
            penalty=proximal(self.cfg.ditto_lambda, trainer.layout.param_views(global_flat)))
        trainer.train(round_idx, client_id, train_indices, model["model"], None, run)
        return Done(trainer.layout.flatten())

    def prepare_eval(self, trainer, round_idx, client_id, train_indices, global_flat, personal):
        trainer.layout.load_(personal)
