"""FedRep: personal head first, then the shared body."""
from __future__ import annotations

from pydantic import Field

from core.personalization.base import NoPersonalization
from core.personalization.fedper import FedPer
from core.sections import MAX_EPOCHS


class FedRep(FedPer):
    """FedRep (Collins et al. 2021, arXiv:2102.07078): each round a client first trains only its
    personal head (``local_layers``) for ``head_epochs`` epochs with the body frozen, then only the
    shared body for ``local_epochs`` epochs with the head frozen; the body is averaged."""

    name = "fedrep"
    summary = "head then body"

    class Options(NoPersonalization.Options):
        head_epochs: int = Field(10, ge=0, le=MAX_EPOCHS, description="fedrep: epochs training the personal head "
                                                                     "before the body")

    def training_phases(self, local_epochs):
        return [(self.cfg.head_epochs, "personal"), (local_epochs, "shared")]
