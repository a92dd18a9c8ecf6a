"""The synthetic MLP with faults built in, for the divergence tests (no change to core)."""
import torch

from experiments.synthetic.model import MLP

POISON_LABEL = 0


class PoisonedMLP(MLP):
    """A step on a batch holding a sample of label ``POISON_LABEL`` makes the loss, and so the
    gradients and the trained weights, NaN: exactly the clients with that label diverge."""

    def loss(self, batch):
        poisoned = (batch["y"] == POISON_LABEL).any()
        return super().loss(batch) * torch.where(poisoned, torch.tensor(float("nan")), torch.tensor(1.0))


class HugeStepMLP(MLP):
    """Every step pushes the hidden layer's biases by ``-lr * 1e30`` (a gradient hook; the loss stays
    finite): client updates stay finite (about 1e30 at lr 0.1), so a large server learning rate takes
    the global model past float32's range."""

    def __init__(self, model_config):
        super().__init__(model_config)
        self.hidden.bias.register_hook(lambda grad: grad + 1e30)
