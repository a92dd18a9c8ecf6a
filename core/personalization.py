"""Personalization methods: which parameters stay on each client, declared as data."""
from __future__ import annotations

from core.errors import UserError


class NoPersonalization:
    """Plain FedAvg: every parameter is global; the personalized model is the global model."""

    name = "none"
    has_personal_layers = False

    def __init__(self, local_layers=()):
        self.local_layers = list(local_layers)


class FedPer(NoPersonalization):
    """FedPer (Arivazhagan et al. 2019, arXiv:1912.00818): the layers named by ``local_layers``
    (module-name prefixes, e.g. ``linear``) are personal. They are trained with the rest on the
    client, never averaged, and kept per client across rounds; a client's first copy comes from
    the global model. The personalized model is the global body with the client's own layers.
    """

    name = "fedper"
    has_personal_layers = True


METHODS = {cls.name: cls for cls in (NoPersonalization, FedPer)}


def build_personalization(cfg):
    """The method named by ``personalization.method`` with its ``local_layers``."""
    if cfg.method not in METHODS:
        raise UserError(f"personalization.method: unknown {cfg.method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg.local_layers)
