"""CIFAR-10 split into federated clients (see core.partition for the partitioners)."""
from __future__ import annotations

import torch

from core.dataset import BaseDataset
from experiments.cv.dataloaders.cifar10 import read_batches


class CIFAR10Dataset(BaseDataset):
    """CIFAR-10 clients. ``inputs`` are uint8 images (N, 3, 32, 32), ``labels`` int64 (N,).

    Built with ``user_idx=-1`` for all clients or ``user_idx=i`` for client ``i`` alone.
    """

    @classmethod
    def load_split(cls, data_path: str, split: str, data_config) -> tuple[torch.Tensor, torch.Tensor]:
        return read_batches(data_path, split, download=getattr(data_config, "download", True))
