"""A tiny task that proves the plug-in path: a two-layer MLP on synthetic Gaussian clusters."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.model import BaseModel


class MLP(BaseModel):
    """Input (B, 32) -> logits (B, num_classes) through one hidden layer of 64 units."""

    def __init__(self, model_config):
        super().__init__(model_config)
        self.hidden = nn.Linear(32, 64)
        self.linear = nn.Linear(64, model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.relu(self.hidden(x)))

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def inference(self, batch: dict) -> dict:
        logits = self(batch["x"])
        return {"output": logits, "acc": (logits.argmax(1) == batch["y"]).float().mean(),
                "batch_size": batch["y"].numel()}
