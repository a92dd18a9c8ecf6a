"""Next-character models for the Shakespeare task: a character embedding, a recurrent body and a
linear decoder named ``linear`` (the personal layer of FedPer: ``local_layers: [linear]``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from core.model import BaseModel
from experiments.shakespeare.dataloaders.dataset import VOCAB

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class CharRNN(BaseModel):
    """Characters (B, T) int codes -> logits (B, num_classes) of the character after the window.

    Defaults are LEAF's / McMahan et al. 2017's Shakespeare model (arXiv:1602.05629): an 8-dim
    embedding, two LSTM layers of 256 units, and a linear decoder from the last step's output
    (815,945 parameters for 65 characters). ``model_config.options``: ``cell`` (``lstm`` or
    ``gru``), ``embed_dim`` (8), ``hidden`` (256), ``layers`` (2). ``model_config.num_classes``
    must be the vocabulary's size, 65.

    Raises:
        UserError: ``num_classes`` is not the vocabulary's size, or an option is out of range.
    """

    OPTIONS = ("cell", "embed_dim", "hidden", "layers")

    def __init__(self, model_config):
        super().__init__(model_config)
        opts = {"cell": "lstm", "embed_dim": 8, "hidden": 256, "layers": 2, **model_config.options}
        if model_config.num_classes != len(VOCAB):
            raise UserError(f"model_config.num_classes: {model_config.num_classes}, but the Shakespeare vocabulary "
                            f"has {len(VOCAB)} characters; set model_config.num_classes: {len(VOCAB)}")
        if opts["cell"] not in CELLS:
            raise UserError(f"model_config.options.cell: {opts['cell']!r}; choose lstm or gru")
        for key in ("embed_dim", "hidden", "layers"):
            if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
                raise UserError(f"model_config.options.{key}: {opts[key]!r}; give a whole number >= 1")
        self.embedding = nn.Embedding(model_config.num_classes, opts["embed_dim"])
        self.rnn = CELLS[opts["cell"]](opts["embed_dim"], opts["hidden"], opts["layers"], batch_first=True)
        self.linear = nn.Linear(opts["hidden"], model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) integer codes -> (B, num_classes) logits of the next character."""
        out, _ = self.rnn(self.embedding(x.long()))
        return self.linear(out[:, -1])

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean cross-entropy (nats per character) of the batch's next characters."""
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def inference(self, batch: dict) -> dict:
        """``output`` logits, ``acc``, ``batch_size``, per-sample ``correct`` and ``loss`` (B,): the
        cross-entropy in nats of each next character (its mean's exp is the perplexity)."""
        logits = self(batch["x"])
        correct = logits.argmax(1) == batch["y"]
        return {"output": logits, "acc": correct.float().mean(), "batch_size": batch["y"].numel(),
                "correct": correct, "loss": F.cross_entropy(logits, batch["y"], reduction="none")}
