"""Batches of character windows on the device."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch

from core.dataset import BaseDataLoader


class ShakespeareLoader(BaseDataLoader):
    """Yields ``{"x": (B, seq_len) uint8 character codes, "y": (B,) int64 next-character codes}``;
    shuffled when given a generator. There is no augmentation (``augment`` is ignored)."""

    def __init__(self, dataset, batch_size, device, train, augment):
        super().__init__(dataset, batch_size, device, train, augment)
        self.x = dataset.inputs.to(device)
        self.y = dataset.labels.to(device)

    def plan_batches(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None) -> Iterator[dict]:
        """Per batch ``{"idx": (B,) int64}``, after one permutation drawn from ``generator``."""
        if generator is not None:
            indices = indices[torch.randperm(indices.numel(), device=self.device, generator=generator)]
        for start in range(0, indices.numel(), self.batch_size):
            yield {"idx": indices[start:start + self.batch_size]}

    def collate(self, plans: list[dict]) -> dict:
        idx = self.join_plans(plans)["idx"]
        return {"x": self.x[idx], "y": self.y[idx]}
