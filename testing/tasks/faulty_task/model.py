"""The synthetic MLP with faults built in, for the divergence tests (no change to core), and with
BatchNorm, for central DP's refusal of shared buffers."""
import torch
from torch import nn

from experiments.synthetic.model import MLP

POISON_LABEL = 0


class PoisonedMLP(MLP):
    """A step on a batch holding a sample of label ``POISON_LABEL`` makes the loss, and so the
    gradients and the trained weights, NaN: exactly the clients with that label diverge."""

    def loss(self, batch):
        poisoned = (batch["y"] == POISON_LABEL).any()
        return super().loss(batch) * torch.where(poisoned, torch.tensor(float("nan")), torch.tensor(1.0))


class HugeStepMLP(MLP):
    """Every step pushes the hidden layer's biases by ``-lr * PUSH`` (a gradient hook; the loss stays
    finite): client updates stay finite and within the exact sum's range (about 1e4 at lr 0.1 and
    PUSH 1e4), so a large server learning rate (1e36) takes the global model past float32's range."""

    PUSH = 1e4

    def __init__(self, model_config):
        super().__init__(model_config)
        self.hidden.bias.register_hook(lambda grad: grad + self.PUSH)


class OutOfRangeMLP(HugeStepMLP):
    """Pushes by 1e30 a step: finite client updates (about 1e30), far beyond the exact sum's range
    (2**22), so every client is dropped."""

    PUSH = 1e30


class BatchNormMLP(MLP):
    """The MLP with a BatchNorm1d on its hidden layer: running statistics (buffers) that FedAvg
    averages, which central DP refuses unless they stay on the clients (FedBN)."""

    def __init__(self, model_config):
        super().__init__(model_config)
        self.norm = nn.BatchNorm1d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu(self.norm(self.hidden(x))))
