"""Batches of CIFAR-10 on the compute device, with batched random-crop and flip augmentation."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F

from core.dataset import BaseDataLoader

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4


class CIFAR10DataLoader(BaseDataLoader):
    """Yields ``{"x": float (B, 3, 32, 32), "y": int64 (B,)}`` on the device.

    ``x`` is standardized per channel (``data_config.normalize``, default) or raw pixels in [0, 1].
    Training batches get random crops of the image padded by 4 pixels (``data_config.pad_mode``:
    zeros, or a reflection of the border) and horizontal flips, drawn for the whole batch at once
    on the device from the caller's generator.
    """

    def __init__(self, dataset, batch_size, device, train, augment):
        super().__init__(dataset, batch_size, device, train, augment)
        cfg = dataset.data_config
        images = dataset.inputs
        if self.augment:  # padded once, on the host (uint8 reflection padding is not on every device)
            images = F.pad(images, (PAD, PAD, PAD, PAD), mode="reflect" if cfg.pad_mode == "reflect" else "constant")
        self.images = images.to(device)
        self.labels = dataset.labels.to(device)
        mean, std = (MEAN, STD) if cfg.normalize else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def plan_batches(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None) -> Iterator[dict]:
        """Per batch ``{"idx": (B,)}``, plus ``"offsets": (B, 2)`` crop corners and ``"flip": (B,) bool``
        when augmenting with a generator (drawn per batch: offsets, then flips)."""
        if generator is not None:
            indices = indices[torch.randperm(indices.numel(), device=self.device, generator=generator)]
        for start in range(0, indices.numel(), self.batch_size):
            idx = indices[start:start + self.batch_size]
            if not (self.augment and generator is not None):
                yield {"idx": idx}
                continue
            n = idx.numel()
            offsets = torch.randint(0, 2 * PAD + 1, (2, n), device=self.device, generator=generator).t()
            flip = torch.rand(n, device=self.device, generator=generator) < 0.5
            yield {"idx": idx, "offsets": offsets, "flip": flip}

    def collate(self, plans: list[dict]) -> dict:
        plan = self.join_plans(plans)
        idx = plan["idx"]
        if "offsets" in plan:
            raw = self._crops(idx, plan["offsets"], plan["flip"])
        elif self.augment:  # augmenting loader read without a generator: the center crop
            raw = self.images[idx][..., PAD:-PAD, PAD:-PAD]
        else:
            raw = self.images[idx]
        return {"x": (raw.float() - self.mean) / self.std, "y": self.labels[idx]}

    def _crops(self, idx: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) uint8 crops of the padded images ``idx`` at corners ``offsets`` (B, 2), mirrored where ``flip``."""
        n = idx.numel()
        span = torch.arange(32, device=self.device)
        rows = (offsets[:, :1] + span).view(n, 1, 32, 1)
        cols = (offsets[:, 1:] + span).view(n, 1, 1, 32)
        chans = torch.arange(3, device=self.device).view(1, 3, 1, 1)
        crops = self.images[idx.view(n, 1, 1, 1), chans, rows, cols]
        return torch.where(flip.view(n, 1, 1, 1), crops.flip(3), crops)
