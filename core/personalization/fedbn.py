"""FedBN: BatchNorm layers stay local."""
from __future__ import annotations

from torch import nn

from core.personalization.base import NoPersonalization


class FedBN(NoPersonalization):
    """FedBN (Li et al. 2021, arXiv:2102.07623): every BatchNorm layer (affine parameters and running
    statistics) stays local; everything else is averaged."""

    name = "fedbn"
    summary = "local BatchNorm"
    evaluates_personalized = True
    keeps_layers_local = True
    personal_module_types = (nn.modules.batchnorm._BatchNorm,)
