"""A task whose rank-2 process dies in its first training step (for the failure test)."""
import os

from experiments.synthetic.model import MLP


class DyingMLP(MLP):
    """The synthetic MLP, except that the process with RANK=2 exits with status 3 in ``loss``."""

    def loss(self, batch):
        if os.environ.get("RANK") == "2":
            os._exit(3)
        return super().loss(batch)
