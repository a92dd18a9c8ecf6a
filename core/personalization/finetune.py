"""Fine-tuning: FedAvg, then local fine-tuning before each evaluation."""
from __future__ import annotations

from pydantic import Field

from core.local_run import epochs_of
from core.personalization.base import NoPersonalization
from core.sections import MAX_EPOCHS


class FineTune(NoPersonalization):
    """Fine-tuning: plain FedAvg training; before a client is evaluated, the global model is
    trained for ``finetune_epochs`` epochs on the client's train split (all parameters, the client
    optimizer, a data order seeded apart from training, no strategy penalty). Nothing is stored
    between rounds."""

    name = "finetune"
    summary = "FedAvg + fine-tuning"
    evaluates_personalized = True

    class Options(NoPersonalization.Options):
        finetune_epochs: int = Field(1, ge=0, le=MAX_EPOCHS, description="finetune: local epochs of fine-tuning "
                                                                         "before evaluation")

    def prepare_eval(self, trainer, round_idx, client_id, train_indices, global_flat, personal):
        trainer.train(round_idx, client_id, train_indices, global_flat, None, epochs_of(self.cfg.finetune_epochs,
                                                                                        stream=1))
