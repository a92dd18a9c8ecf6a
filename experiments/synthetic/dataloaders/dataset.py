"""Synthetic 10-class Gaussian clusters in 32 dimensions (5,000 train, 1,000 test); no files needed."""
from __future__ import annotations

import torch

from core.dataset import BaseDataset

SIZES = {"train": 5000, "test": 1000}


class GaussianClusters(BaseDataset):
    """Class ``c`` samples are ``mean_c + noise``; the means are fixed by a constant seed.

    ``data_path`` is ignored (-dataPath may be left out), so this task runs anywhere; the partition
    follows ``data_config``.
    """

    READS_FILES = False

    @classmethod
    def load_split(cls, data_path, split, data_config) -> tuple[torch.Tensor, torch.Tensor]:
        means = torch.randn(10, 32, generator=torch.Generator().manual_seed(1234))
        gen = torch.Generator().manual_seed(1 if split == "train" else 2)
        labels = torch.arange(SIZES[split]) % 10
        return means[labels] + 1.5 * torch.randn(SIZES[split], 32, generator=gen), labels
