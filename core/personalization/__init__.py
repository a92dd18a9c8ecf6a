"""Personalization methods, one module each: which parameters stay on each client, what separate
personal model a client keeps, how it trains and how its personalized model is evaluated.

Adding a method is a new module here with its class (options, check, named model state, hooks)
and one line in :data:`METHODS`; no engine file changes.
"""
from __future__ import annotations

from core.errors import UserError
from core.personalization.apfl import APFL
from core.personalization.base import NoPersonalization
from core.personalization.ditto import Ditto
from core.personalization.fedbn import FedBN
from core.personalization.fedper import FedPer
from core.personalization.fedrep import FedRep
from core.personalization.finetune import FineTune
from core.personalization.lgfedavg import LGFedAvg
from core.personalization.local import LocalOnly
from core.personalization.pfedme import PFedMe

METHODS = {cls.name: cls for cls in (NoPersonalization, FedPer, FedRep, LGFedAvg, FedBN, LocalOnly, FineTune, Ditto,
                                     APFL, PFedMe)}

__all__ = ["APFL", "Ditto", "FedBN", "FedPer", "FedRep", "FineTune", "LGFedAvg", "LocalOnly", "METHODS",
           "NoPersonalization", "PFedMe", "build_personalization"]


def build_personalization(cfg):
    """The method named by ``personalization.method``, configured by the ``personalization`` section.

    Raises:
        UserError: no method has that name.
    """
    if cfg.method not in METHODS:
        raise UserError(f"personalization.method: unknown {cfg.method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)
