"""LG-FedAvg: local representation layers, global head."""
from __future__ import annotations

from core.personalization.fedper import FedPer


class LGFedAvg(FedPer):
    """LG-FedAvg (Liang et al. 2020, arXiv:2001.01523): local representation layers, global head.
    ``local_layers`` names the local body modules (the complement of FedPer's choice)."""

    name = "lgfedavg"
    summary = "local body"
