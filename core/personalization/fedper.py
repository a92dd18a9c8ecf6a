"""FedPer: the layers named by local_layers (usually the head) stay on each client."""
from __future__ import annotations

from core.personalization.base import NoPersonalization


class FedPer(NoPersonalization):
    """FedPer (Arivazhagan et al. 2019, arXiv:1912.00818): the layers named by ``local_layers``
    (module-name prefixes, usually the head, e.g. ``linear``) are personal; the body is shared."""

    name = "fedper"
    summary = "local head"
    uses_local_layers = True
    evaluates_personalized = True
    keeps_layers_local = True

    def personal_names(self, layout, model):
        return layout.names_matching(self.local_layers)
