"""Batches of the synthetic task on the device."""
from __future__ import annotations

import torch

from core.dataset import BaseDataLoader


class SyntheticLoader(BaseDataLoader):
    """Yields ``{"x": (B, 32) float, "y": (B,) int64}``; shuffled when given a generator."""

    def __init__(self, dataset, batch_size, device, train, augment):
        super().__init__(dataset, batch_size, device, train, augment)
        self.x = dataset.inputs.to(device)
        self.y = dataset.labels.to(device)

    def plan_batches(self, indices, generator=None):
        if generator is not None:
            indices = indices[torch.randperm(indices.numel(), device=self.device, generator=generator)]
        for start in range(0, indices.numel(), self.batch_size):
            yield {"idx": indices[start:start + self.batch_size]}

    def collate(self, plans):
        idx = self.join_plans(plans)["idx"]
        return {"x": self.x[idx], "y": self.y[idx]}
