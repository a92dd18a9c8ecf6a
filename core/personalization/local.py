"""Local training only: the lower baseline."""
from __future__ import annotations

from core.personalization.base import NoPersonalization


class LocalOnly(NoPersonalization):
    """Local training only: every tensor is personal, nothing is federated (the lower baseline
    every personalization method must beat). The global model stays at its initialisation."""

    name = "local"
    summary = "no federation"
    evaluates_personalized = True
    keeps_layers_local = True

    def personal_names(self, layout, model):
        return list(layout.names)
